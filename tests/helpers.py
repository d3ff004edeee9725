"""Small helpers shared by test modules (import as `from tests.helpers import ...`)."""

from __future__ import annotations

from pathlib import Path

from pas.hashing import sha256_file


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file below `root` (subdirectories too) by its path relative to `root`: compare
    two runs' outputs without holding their bytes."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
