"""Model files: every model is resolved by the `models` stage to a local folder under `models/`
and loaded afterwards only from there, by the real loaders (open_clip, diffusers, TorchScript,
transformers, timm). Tiny seeded builders give the offline profile the same formats."""
