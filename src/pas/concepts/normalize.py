"""Concept normalisation: the one definition of "the same concept" used by every |·| of §3.1.

Two strings are the same concept iff ``normalize_concept`` maps them to the same key: Unicode NFKC,
markdown emphasis, list numbering/bullets, surrounding quotes, trailing punctuation and extra
whitespace removed, case folded. The key itself is what the bank stores (lower case).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Iterable

from pas.llm.parse import LETTER, MARKDOWN, MARKER

_QUOTES = "\"'“”‘’«»`"
_TRAIL = re.compile(r"[\s.,;:!?…]+$")
_LEAD = re.compile(r"^[\s.,;:!?…]+")


def normalize_concept(text: str | None) -> str | None:
    """Canonical key of a concept string, or None if nothing nameable is left."""
    if text is None:
        return None
    s = unicodedata.normalize("NFKC", str(text))
    s = MARKDOWN.sub("", s)
    s = " ".join(s.split())  # all whitespace (tabs, newlines, NBSP after NFKC) → one space
    prev = None
    while prev != s:  # peel nested decorations: '1. "Paella."' → Paella
        prev = s
        s = MARKER.sub("", s, count=1)
        s = s.strip().strip(_QUOTES).strip()
        s = _TRAIL.sub("", s)
        s = _LEAD.sub("", s)
    s = s.casefold()
    return s if LETTER.search(s) else None


def normalize_all(texts: Iterable[str]) -> list[str]:
    """Keys of `texts`, first occurrence order, duplicates and unnameable strings removed."""
    return list(dict.fromkeys(k for k in map(normalize_concept, texts) if k is not None))
