"""Stage 2 of the paper (§3.2, "Collecting Domain-Specific Images"): real images retrieved from a pool
for every concept (`retrieve`), synthetic images generated from LLM-written scene captions (`generate`).

Shared here: reading the accepted concepts of the concept bank.
"""

from __future__ import annotations

from pathlib import Path


def load_concepts(bank_path: str | Path) -> list[str]:
    """Accepted concepts of `data/concepts/bank.parquet` (columns concept, accepted): stripped,
    non-empty, unique, sorted (so the output does not depend on the bank's row order)."""
    from pas.io.manifest import read_parquet

    bank_path = Path(bank_path)
    if not bank_path.is_file():
        raise FileNotFoundError(f"{bank_path}: concept bank not found; run `dvc repro concepts`")
    df = read_parquet(bank_path)
    missing = {"concept", "accepted"} - set(df.columns)
    if missing:
        raise ValueError(f"{bank_path}: missing column(s) {sorted(missing)} (have {list(df.columns)})")
    accepted = df[df["accepted"].astype(bool)]["concept"]
    return sorted({str(c).strip() for c in accepted if isinstance(c, str) and c.strip()})
