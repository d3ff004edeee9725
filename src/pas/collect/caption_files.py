"""T_c as data: :class:`Captions` (n_cap captions per concept, each flagged when it is a template
fallback, and L4's transcripts), their files, and the one seed derivation of §3.2 (caption requests
and image noise). The `captions` stage writes them (`pas.collect.captions`), `generate` reads them;
nothing here talks to an LLM, so `generate` does not depend on the LLM code.

Files (the `captions` stage's out, `data/captions/`): `captions.parquet` (concept, caption_idx,
caption, fallback; sorted by concept, caption_idx) and `transcripts.jsonl` (every L4 request and its
answer, in request order); `generate` keeps a copy beside its images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Captions:
    """T_c per concept: captions[c] = [(caption, fallback?)] of length n_cap; raw L4 transcripts."""

    captions: dict[str, list[tuple[str, bool]]]
    transcripts: list[dict] = field(default_factory=list)

    @property
    def n_fallback(self) -> int:
        return sum(fb for lst in self.captions.values() for _, fb in lst)

    @property
    def n_captions(self) -> int:
        return sum(len(lst) for lst in self.captions.values())

    @property
    def fallback_fraction(self) -> float:
        return self.n_fallback / self.n_captions if self.n_captions else 0.0

    @property
    def n_failed_requests(self) -> int:
        return sum(bool(t.get("error")) for t in self.transcripts)

    def rows(self) -> list[dict]:
        return [{"concept": c, "caption_idx": i, "caption": cap, "fallback": fb}
                for c in sorted(self.captions) for i, (cap, fb) in enumerate(self.captions[c])]

    @property
    def n_requests(self) -> int:
        return len(self.transcripts)

    def metrics(self) -> dict:
        out = {"n_concepts": len(self.captions), "n_captions": self.n_captions,
               "n_fallback_captions": self.n_fallback, "fallback_fraction": self.fallback_fraction,
               "n_failed_caption_requests": self.n_failed_requests, "n_requests": self.n_requests}
        parsed = [t["parsed"] for t in self.transcripts if "parsed" in t]
        if parsed:  # requests carried L4's list schema: answers read as JSON, and those parsed as text
            out.update(n_structured_answers=parsed.count("json"), n_text_fallback_answers=parsed.count("text"))
        return out


CAPTION_COLUMNS = ["concept", "caption_idx", "caption", "fallback"]


def write_caption_files(captions: Captions, parquet: str | Path, transcripts: str | Path) -> None:
    """The captions (sorted by concept, caption_idx) and the L4 transcripts (request order): the
    `captions` stage's out, and their copy beside the images in `generate`'s."""
    import pandas as pd

    from pas.io.manifest import write_parquet

    write_parquet(pd.DataFrame(captions.rows(), columns=CAPTION_COLUMNS), parquet, sort_by=None)
    with open(transcripts, "w", encoding="utf-8") as f:
        for t in captions.transcripts:
            f.write(json.dumps(t, ensure_ascii=False, sort_keys=True) + "\n")


def read_captions(folder: str | Path) -> Captions:
    """The `captions` stage's out (`captions.parquet`, `transcripts.jsonl`) as :class:`Captions`."""
    from pas.io.manifest import read_parquet

    folder = Path(folder)
    path = folder / "captions.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: captions not found; run `dvc repro captions`")
    df = read_parquet(path)
    missing = set(CAPTION_COLUMNS) - set(df.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)} (have {list(df.columns)})")
    caps: dict[str, list[tuple[str, bool]]] = {}
    for c, i, cap, fb in zip(df["concept"], df["caption_idx"], df["caption"], df["fallback"]):
        lst = caps.setdefault(str(c), [])
        if int(i) != len(lst) or not isinstance(cap, str):
            raise ValueError(f"{path}: concept {c!r}: caption {i} out of order or not text")
        lst.append((cap, bool(fb)))
    tpath = folder / "transcripts.jsonl"
    if not tpath.is_file():
        raise FileNotFoundError(f"{tpath}: L4 transcripts not found; run `dvc repro captions`")
    with open(tpath, encoding="utf-8") as f:
        transcripts = [json.loads(line) for line in f if line.strip()]
    return Captions(caps, transcripts)
