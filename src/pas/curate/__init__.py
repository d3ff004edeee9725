"""Curation of the collected images: Pareto-front ranking of OOD scores, kneedle stop, final pruning."""
