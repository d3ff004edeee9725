"""sha256 digests (hex): of a file's bytes, of bytes or text, of a JSON value in canonical form. The one
rule for fingerprints, resume keys and model checksums; imports only the standard library."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read `chunk` bytes at a time (model weights are gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes | str) -> str:
    """sha256 of `data`; text as UTF-8 with surrogatepass: an LLM answer may hold a lone surrogate,
    other text gives the bytes of plain UTF-8."""
    return hashlib.sha256(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data).hexdigest()


def sha256_json(obj: Any, *, ensure_ascii: bool = False, default: Callable[[Any], Any] | None = None) -> str:
    """sha256 of `obj` as JSON with sorted keys (dict order does not count). `ensure_ascii` and
    `default` are json.dumps's: each fingerprint keeps the bytes it has always hashed, so resume files
    written before stay valid."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, ensure_ascii=ensure_ascii, default=default))
