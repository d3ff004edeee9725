"""Stage 2 of the paper (§3.2, "Collecting Domain-Specific Images"): real images retrieved from a pool
for every concept (`retrieve`), synthetic images generated from LLM-written scene captions (`generate`).
"""
