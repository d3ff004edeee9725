"""Stage 1 of PaS (§3.1): concept discovery (generation, expansion, validation) and its coverage metric.

Downstream stages read the accepted bank with :func:`load_bank`.
"""

from __future__ import annotations

from pathlib import Path


def load_bank(concepts_dir: str | Path = "data/concepts", accepted_only: bool = True) -> list[str]:
    """Concepts of `data/concepts/bank.parquet`, sorted; only the validated ones by default."""
    import pyarrow.parquet as pq

    path = Path(concepts_dir) / "bank.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no concept bank (run `dvc repro concepts` first)")
    table = pq.read_table(path, columns=["concept", "accepted"]).to_pydict()
    return sorted(c for c, ok in zip(table["concept"], table["accepted"]) if ok or not accepted_only)
