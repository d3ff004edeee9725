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
and counted in the metrics. Requests the backend failed on are counted too: the fallbacks of a
concept that had one are not cached (a rerun asks L4 again), and the `generate` stage fails when
fallbacks exceed `generate.max_fallback_fraction` of all captions.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

# deterministic fallbacks when L4 does not deliver: still the concept in a (plain) scene
FALLBACK_TEMPLATES = (
    "a photo of {c}, centered, natural light.",
    "a photo of {c}, close-up, on a table.",
    "a photo of {c}, outdoors, daylight.",
    "a photo of {c}, from above, soft shadows.",
    "a photo of {c}, in its typical setting.",
)
PREFIX = re.compile(r"^(?:caption|prompt|image|scene|photo)\s*\d*\s*[:\-–—]\s*", re.IGNORECASE)


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 31-bit seed from the run seed and any parts (concept text, indices, ...)."""
    h = hashlib.sha256("\x1f".join([str(seed), *map(str, parts)]).encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest()[:4], "big") & 0x7FFF_FFFF


def load_template(path: str | Path | None = None) -> str:
    """The caption prompt template: `path`, or the packaged `pas/prompts/captions.txt`."""
    if path is None:
        return resources.files("pas").joinpath("prompts/captions.txt").read_text(encoding="utf-8")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"generate.prompt_file={str(path)!r}: no such file")
    text = p.read_text(encoding="utf-8")
    if "{concept}" not in text:
        raise ValueError(f"{p}: caption template must contain {{concept}}")
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
                   min_words: int = 4, max_words: int = 60) -> list[str]:
    """Captions in an L4 answer: one per list item/line, numbering/bullets/quotes/markdown/"Caption:"
    removed, whitespace collapsed, cut to its leading sentences within `max_words`, ending with a
    period; items of fewer than `min_words` words are dropped, and (if `require_concept`) items
    that do not name the concept."""
    from pas.llm.parse import parse_list

    parsed = parse_list(text, max_words=10_000, max_chars=100_000, split_commas=False,
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

    @property
    def n_failed_fallbacks(self) -> int:
        """Fallback captions of concepts with a failed L4 request (they may stand in for a failure)."""
        failed = {t["concept"] for t in self.transcripts if t.get("error")}
        return sum(fb for c in failed for _, fb in self.captions.get(c, []))

    def rows(self) -> list[dict]:
        return [{"concept": c, "caption_idx": i, "caption": cap, "fallback": fb}
                for c in sorted(self.captions) for i, (cap, fb) in enumerate(self.captions[c])]


def write_captions(llm: Any, concepts: Sequence[str], n_cap: int, seed: int, template: str,
                   max_attempts: int = 3, max_new_tokens: int = 64, require_concept: bool = True,
                   min_words: int = 4, max_words: int = 60, progress: bool = True) -> Captions:
    """Sample T_c = {t_c ~ P_L4(c)}: n_cap independent one-caption requests per concept, all concepts
    in one batched `llm.chat` call per attempt.

    Request j of attempt a for concept c has seed derive_seed(seed, "caption", c, a, j); its first
    usable caption is kept unless the concept already has it. Concepts still short are asked again
    (attempt a + 1) for what is missing, up to `max_attempts`; the rest is filled with template
    captions (`fallback=True`). Deterministic given the backend's per-request seeding.
    """
    from tqdm import tqdm

    from pas.llm import ChatRequest

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
                                        max_new_tokens=max_new_tokens))
        if not reqs:
            break
        results = llm.chat(reqs)
        for c, req, res in zip(owners, reqs, results):
            transcripts.append({"concept": c, "attempt": attempt, "seed": req.seed, "answer": res.text,
                                "error": getattr(res, "error", None)})
            for cap in clean_captions(res.text, c, require_concept, min_words, max_words):
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
