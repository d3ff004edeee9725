"""JSON files as the pipeline writes them: sorted keys, so the same value gives the same bytes (DVC
compares metrics and markers byte for byte). Imports only the standard library."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write `data` to a temp name beside `path`, then rename it over `path`: a killed run leaves the
    old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2, ensure_ascii: bool = True,
               newline: bool = True, atomic: bool = False) -> Path:
    """`obj` as JSON with sorted keys into `path` (parent folders made). `indent` None: one line;
    `newline`: end with "\\n"; `atomic`: through `write_atomic` (resume markers). The keyword defaults
    are those of metrics and model configs; a file written otherwise before keeps its bytes by its
    arguments."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=ensure_ascii) + ("\n" if newline else "")
    if atomic:
        write_atomic(path, text)
    else:
        path.write_text(text)
    return path
