"""Seeds derived from the run seed: one rule for every stage that seeds per item (L1/L2 requests, L4
captions, generated images), the same on every machine and Python run."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 31-bit seed for (seed, parts...): sha256 of their text joined by \\x1f. surrogatepass:
    a concept from an LLM answer may hold a lone surrogate; the bytes are the same otherwise."""
    h = hashlib.sha256("\x1f".join(map(str, (seed, *parts))).encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFF_FFFF
