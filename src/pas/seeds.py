"""Seeds derived from the run seed: one rule for every stage that seeds per item (L1/L2 requests, L4
captions, generated images), the same on every machine and Python run."""

from __future__ import annotations

from pas.hashing import sha256_bytes


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 31-bit seed for (seed, parts...): the first 4 bytes of the sha256 of their text joined
    by \\x1f. `sha256_bytes` encodes with surrogatepass: a concept from an LLM answer may hold a lone
    surrogate; the bytes are the same otherwise."""
    return int(sha256_bytes("\x1f".join(map(str, (seed, *parts))))[:8], 16) & 0x7FFF_FFFF
