"""Pretraining and evaluation: `evalsets` (fixed eval splits), `pretrain` (MoCo v3 / NNCLR), `evaluate` (kNN, linear)."""
