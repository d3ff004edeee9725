"""Stage 1 of PaS (§3.1): concept discovery (generation, expansion, validation) and its coverage metric.

Downstream stages (retrieve, captions, ood, the report) read the accepted bank with :func:`load_bank`.
"""

from __future__ import annotations

from pathlib import Path


def load_bank(path: str | Path = "data/concepts/bank.parquet") -> list[str]:
    """Accepted concepts of the concept bank (columns concept, accepted): stripped, non-empty, unique,
    sorted (so what reads them does not depend on the bank's row order)."""
    from pas.io.manifest import read_parquet

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: concept bank not found; run `dvc repro concepts`")
    df = read_parquet(path)
    missing = {"concept", "accepted"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)} (have {list(df.columns)})")
    accepted = df[df["accepted"].astype(bool)]["concept"]
    return sorted({str(c).strip() for c in accepted if isinstance(c, str) and c.strip()})
