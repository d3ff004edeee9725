"""In-context in-domain captions (paper §3.2): L4 writes N_Cap scene captions per concept.

"We use a LLM, denoted as L4, to craft detailed image captions that encapsulate the essence of a given
concept c ∈ B ... We sample N_Cap captions for each concept, T_c = {t_c ~ P_L4(c)}, creating scene
descriptions that enrich the conceptual depiction (e.g. "A majestic Canada Goose spreads its wings,
taking flight above the frozen lake.")."

Each caption is its own sample: one request per caption, seeded per (concept, attempt, index), so
captions are independent draws and a 135M-parameter offline model is not asked for a list it cannot
keep on topic (measured: asked for a numbered list with an example, SmolLM2-135M wrote about the
example instead of the concept). The prompt template is a file (`src/pas/prompts/captions.txt`,
placeholder `{concept}`). Answers are parsed robustly (numbering, bullets, quotes, markdown,
preambles, empty lines, rambling paragraphs cut to their first sentences). A concept with fewer
than N_Cap usable captions is asked again with new seeds for what is missing, up to `max_attempts`
times; what is still missing is filled with deterministic template captions ("a photo of {c}, ...")
and counted in the metrics. Requests the backend failed on are counted too, and the `captions`
stage fails when fallbacks exceed `captions.max_fallback_fraction` of all captions.

Where L4's backend decodes to a JSON schema (`llm.l4.structured`), each request carries the list
schema with one item, and an answer that follows it is read from its JSON; anything else is parsed
as text. Such transcripts record which (`parsed`: json | text), counted in the metrics as
`n_structured_answers` / `n_text_fallback_answers` (absent when no request carried a schema).

Resumable: with an :class:`pas.llm.cache.AnswerCache`, every piece of answers is saved as L4 finishes
it (`ChatBackend.chat_stream`); a killed run asks again only the requests it has no answer for, and
failed requests are never saved, so a rerun asks them again. Answers follow from (request, seed), so
a resumed run writes the captions of an uninterrupted one (transformers: padding aside, as there).

The stage's out, `data/captions/`, is written and read with `pas.collect.caption_files`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from pas.collect.caption_files import Captions
from pas.params import ParamsError, check_range, check_seed
from pas.seeds import derive_seed

# deterministic fallbacks when L4 does not deliver: still the concept in a (plain) scene
FALLBACK_TEMPLATES = (
    "a photo of {c}, centered, natural light.",
    "a photo of {c}, close-up, on a table.",
    "a photo of {c}, outdoors, daylight.",
    "a photo of {c}, from above, soft shadows.",
    "a photo of {c}, in its typical setting.",
)
PREFIX = re.compile(r"^(?:caption|prompt|image|scene|photo)\s*\d*\s*[:\-–—]\s*", re.IGNORECASE)


@dataclass(frozen=True)
class CaptionsParams:
    """`captions:` (+ top-level n_cap, seed) — how L4 (`llm.l4`) writes T_c."""

    n_cap: int = 5                # N_Cap: captions per concept (one L4 request each)
    seed: int = 0
    prompt_file: str | None = None  # caption prompt template; None = packaged pas/prompts/captions.txt
    max_attempts: int = 3         # L4 rounds (new seeds) for missing captions before template fallbacks
    max_new_tokens: int = 64      # L4 answer length (one caption per request)
    require_concept: bool = True  # drop captions that do not name the concept
    min_words: int = 4            # drop shorter captions
    max_words: int = 60           # drop longer captions (SD's text encoder reads 77 tokens)
    max_fallback_fraction: float = 0.5  # fail when more template fallbacks than this fraction of all
                                        # captions: L4 is broken or unfit, not just unlucky

    def __post_init__(self) -> None:
        check_range("n_cap", self.n_cap, 0, None, lo_open=False)
        check_seed("seed", self.seed)
        for name in ("max_attempts", "max_new_tokens", "min_words"):
            check_range(name, getattr(self, name), 1, None, lo_open=False)
        check_range("max_words", self.max_words, self.min_words, None, lo_open=False)
        check_range("max_fallback_fraction", self.max_fallback_fraction, 0.0, 1.0, lo_open=False, hi_open=False)
        if self.prompt_file is not None and not self.prompt_file.strip():
            raise ParamsError("prompt_file: empty; use null for the packaged template")


def load_template(path: str | Path | None = None) -> str:
    """The caption prompt template: `path`, or the packaged `pas/prompts/captions.txt`."""
    if path is None:
        return resources.files("pas").joinpath("prompts/captions.txt").read_text(encoding="utf-8")
    p = Path(path)
    if not p.is_file():
        raise ParamsError(f"captions.prompt_file={str(path)!r}: no such file")
    text = p.read_text(encoding="utf-8")
    if "{concept}" not in text:
        raise ParamsError(f"captions.prompt_file={str(path)!r}: the template must contain {{concept}}")
    return text


def render(template: str, concept: str) -> str:
    """Fill the template by plain replacement (braces inside a concept stay literal)."""
    return template.replace("{concept}", concept)


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", s)).strip().casefold()


SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _first_sentences(text: str, max_words: int) -> str:
    """Leading whole sentences of `text` up to `max_words` words ("" if the first one is longer).
    A trailing unfinished sentence (answer cut by max_new_tokens) is dropped when a complete one
    precedes it."""
    sents = SENTENCE_END.split(text)
    if len(sents) > 1 and not sents[-1].rstrip().endswith((".", "!", "?")):
        sents = sents[:-1]
    out: list[str] = []
    for sent in sents:
        if len(" ".join(out + [sent]).split()) > max_words:
            break
        out.append(sent)
    return " ".join(out)


def clean_captions(text: str | None, concept: str, require_concept: bool = True,
                   min_words: int = 4, max_words: int = 60, schema: dict | None = None) -> list[str]:
    """Captions in an L4 answer: one per list item/line (the JSON items where the answer follows the
    request's `schema`), numbering/bullets/quotes/markdown/"Caption:" removed, whitespace collapsed,
    cut to its leading sentences within `max_words`, ending with a period; items of fewer than
    `min_words` words are dropped, and (if `require_concept`) items that do not name the concept."""
    from pas.llm.parse import parse_answer

    parsed = parse_answer(text, schema, max_words=10_000, max_chars=100_000, split_commas=False,
                          cut_explanations=False)
    out = []
    for item in parsed.items:
        cap = PREFIX.sub("", item).strip().strip("\"'“”‘’«»*").strip()
        cap = _first_sentences(re.sub(r"\s+", " ", cap), max_words).strip()
        if not cap or len(cap.split()) < min_words:
            continue
        if require_concept and _norm(concept) not in _norm(cap):
            continue
        if not cap.endswith((".", "!", "?")):
            cap += "."
        out.append(cap)
    return out


def fallback_captions(concept: str, n: int) -> list[str]:
    """n distinct template captions (the templates cycle with a view number after the first round)."""
    k = len(FALLBACK_TEMPLATES)
    out = []
    for i in range(n):
        cap = FALLBACK_TEMPLATES[i % k].replace("{c}", concept)
        out.append(cap if i < k else f"{cap[:-1]}, view {i // k + 1}.")
    return out


def write_captions(llm: Any, concepts: Sequence[str], n_cap: int, seed: int, template: str,
                   max_attempts: int = 3, max_new_tokens: int = 64, require_concept: bool = True,
                   min_words: int = 4, max_words: int = 60, progress: bool = True,
                   answers: Any = None) -> Captions:
    """Sample T_c = {t_c ~ P_L4(c)}: n_cap independent one-caption requests per concept, all concepts
    in one batched `llm.chat_stream` call per attempt.

    Request j of attempt a for concept c has seed derive_seed(seed, "caption", c, a, j); its first
    usable caption is kept unless the concept already has it. Concepts still short are asked again
    (attempt a + 1) for what is missing, up to `max_attempts`; the rest is filled with template
    captions (`fallback=True`). Deterministic given the backend's per-request seeding.
    `answers` (a :class:`pas.llm.cache.AnswerCache`): requests answered before are not asked again,
    and each piece of new answers is saved as soon as L4 returns it.
    """
    from tqdm import tqdm

    from pas.llm import ChatRequest
    from pas.llm.parse import structured_items

    schema = llm.list_schema(max_items=1)
    have: dict[str, list[str]] = {c: [] for c in concepts}
    seen: dict[str, set[str]] = {c: set() for c in concepts}
    transcripts: list[dict] = []
    bar = tqdm(total=len(concepts) * n_cap, desc="L4 captions", unit="cap", disable=not progress)
    for attempt in range(max_attempts):
        owners, reqs = [], []
        for c in concepts:
            prompt = render(template, c)
            for j in range(n_cap - len(have[c])):
                owners.append(c)
                reqs.append(ChatRequest(messages=({"role": "user", "content": prompt},),
                                        seed=derive_seed(seed, "caption", c, attempt, j),
                                        max_new_tokens=max_new_tokens, schema=schema))
        if not reqs:
            break
        results: list[Any] = [answers.get(r) if answers is not None else None for r in reqs]
        todo = [k for k, r in enumerate(results) if r is None]
        for idx, got in llm.chat_stream([reqs[k] for k in todo]):
            for i, res in zip(idx, got):
                results[todo[i]] = res
            if answers is not None:
                answers.put((reqs[todo[i]], res) for i, res in zip(idx, got))
        for c, req, res in zip(owners, reqs, results):
            rec = {"concept": c, "attempt": attempt, "seed": req.seed, "answer": res.text,
                   "error": getattr(res, "error", None)}
            if schema is not None and not rec["error"]:
                rec["parsed"] = "text" if structured_items(res.text, schema) is None else "json"
            transcripts.append(rec)
            for cap in clean_captions(res.text, c, require_concept, min_words, max_words, schema):
                if _norm(cap) not in seen[c]:
                    if len(have[c]) < n_cap:
                        seen[c].add(_norm(cap))
                        have[c].append(cap)
                        bar.update(1)
                    break
    bar.close()
    captions = {}
    for c in concepts:
        got = [(cap, False) for cap in have[c]]
        extra = [cap for cap in fallback_captions(c, 2 * n_cap) if _norm(cap) not in seen[c]]
        captions[c] = got + [(cap, True) for cap in extra[:n_cap - len(got)]]
    return Captions(captions, transcripts)
