"""CLIP-based OOD assessment (paper §3.3), with CLIPN's yes/no probabilities.

For an image embedding f and a concept set B with "yes" text embeddings g_c and "no" embeddings g_c^no
(all L2-normalised), with s the CLIP logit scale (100):

    logit_c    = s·cos(f, g_c)          logit_c^no = s·cos(f, g_c^no)
    p_c        = softmax_c(logit)_c                                   (which concept the image shows)
    p_c^no     = softmax([logit_c, logit_c^no])[1] = σ(logit_c^no − logit_c)   (CLIPN: "it is not c")
    OOD_B(I)   = 1 − Σ_{c∈B} (1 − p_c^no)·p_c

That is 1 − CLIPN's ATD ("agreeing-to-differ") in-distribution score Σ_c p_c·(1 − p_c^no); CLIPN's CTW
("competing-to-win") score would be p^no of the argmax concept alone. CTW and ATD are two scores of
the same CLIPN weights (xmed-lab/CLIPN, src/zero_shot_infer.py computes both from one model).

The paper scores every image with three metrics: OOD_B(I) over the concept bank, OOD_B'(I) over a
generalised concept set B', and OOD_B(I') − OOD_B(I), I' = I with its text regions blurred.

`ood_scores` streams over concept chunks with a running log-sum-exp, so 5k concepts × 1M images never
build the dense 1M×5k matrix: memory is image_chunk × concept_chunk.

"No" embeddings come from CLIPN's no-tower when `models.clipn` is configured (`pas.models.clipn`; CLIPN
feeds it the same prompt templates as the yes-tower, and its frozen base CLIP embeds the images and
reads the yes prompts), else from the trained no head beside `models/clip` (`pas.models.no_head`),
else from the plain CLIP text tower with negative prompt templates ("a photo of no {}.").
Either way a concept's embedding is the prompt ensemble
Σ_t normalise(enc(template_t(c))) re-normalised, as CLIPN's `merge_yes_no_feature` does.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Sequence

import numpy as np

from pas.hashing import sha256_json
from pas.io.resume import Table, WorkStore, file_identity
from pas.params import ParamsError, check_choice, check_range, renamed

log = logging.getLogger(__name__)

# A small ensemble (CLIPN uses 130 templates; 5k concepts × 130 prompts is costly on CPU — add more here).
DEFAULT_YES_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a good photo of the {}.",
)
DEFAULT_NO_TEMPLATES = (
    "a photo of no {}.",
    "a photo without a {}.",
    "a close-up photo of no {}.",
    "a good photo without the {}.",
)


@dataclass(frozen=True)
class OodParams:
    """params.yaml section `ood`."""

    generalized_concepts: tuple[str, ...] = ()   # B'; empty = derived from domain.name/description
    yes_templates: tuple[str, ...] = DEFAULT_YES_TEMPLATES   # each holds one "{}" for the concept
    no_templates: tuple[str, ...] = DEFAULT_NO_TEMPLATES     # negative prompts (plain-CLIP mode only)
    blur_kind: str = "gaussian"      # "gaussian" | "fill" (mean colour of the box, as T-MARS)
    blur_radius: float = 0.0         # Gaussian radius in px; 0 = half of each box's short side
    det_limit_side_len: int = 320    # text detector input: longer side scaled down to ≤ this
    det_box_thresh: float = 0.5      # DBNet minimum mean score of a text box
    threads: int = 0                 # the text detector's (onnxruntime) CPU threads; 0 = its default
    batch_size: int = 64             # images per CLIP forward pass
    concept_chunk: int = 1024        # concepts per score block (memory: image_chunk × concept_chunk)
    image_chunk: int = 4096          # images per score block
    device: str = "cpu"

    # keys of older params.yaml files, refused with where their setting lives now (`pas.params.build`)
    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "clipn_checkpoint": "CLIPN is a model family now: set `models.clipn` "
                            "({kind: clipn, base: {...}, checkpoint: {path: ...}}, README) and delete this key",
        "det_threads": renamed("ood.threads")}

    def __post_init__(self) -> None:
        for name in ("yes_templates", "no_templates"):
            templates = getattr(self, name)
            if not templates:
                raise ParamsError(f"{name}: needs at least one template")
            for t in templates:
                if t.count("{}") != 1:
                    raise ParamsError(f"{name}: template {t!r} must contain exactly one '{{}}'")
        if any(not c.strip() for c in self.generalized_concepts):
            raise ParamsError("generalized_concepts: empty concept name")
        check_choice("blur_kind", self.blur_kind, ("gaussian", "fill"))
        check_range("blur_radius", self.blur_radius, 0.0, None, lo_open=False)
        check_range("det_limit_side_len", self.det_limit_side_len, 32, None, lo_open=False)
        check_range("det_box_thresh", self.det_box_thresh, 0.0, 1.0)
        check_range("threads", self.threads, 0, None, lo_open=False)
        for name in ("batch_size", "concept_chunk", "image_chunk"):
            check_range(name, getattr(self, name), 1, None, lo_open=False)


@dataclass(frozen=True)
class OodModels:
    """The models `ood` scores with: `clip_dir` embeds the images and is the yes-tower; the no-tower is
    CLIPN's (`clipn_checkpoint`, on `clip_dir` = CLIPN's base), else the no head saved in `clip_dir`,
    else none (negative prompts)."""

    clip_dir: str
    clipn_checkpoint: str | None = None

    @property
    def mode(self) -> str:
        from pas.models.no_head import NO_HEAD_FILE

        if self.clipn_checkpoint:
            return "clipn"
        return "no_head" if (Path(self.clip_dir) / NO_HEAD_FILE).is_file() else "negative_prompts"


def ood_models(clip_dir: str, clipn_dir: str | None = None) -> OodModels:
    """CLIPN's base + checkpoint when `clipn_dir` (models/clipn) is configured, else `clip_dir`."""
    if clipn_dir:
        from pas.models.clipn import read_clipn_dir

        found = read_clipn_dir(clipn_dir)
        if found is not None:
            return OodModels(str(found[0]), str(found[1]))
    return OodModels(str(clip_dir))


# ---------------------------------------------------------------------------------------------
# scores on arrays

def _check_unit(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array, got shape {x.shape}")
    return x


def ood_scores(f: np.ndarray, g_yes: np.ndarray, g_no: np.ndarray, scale: float = 100.0,
               concept_chunk: int = 1024, image_chunk: int = 4096) -> np.ndarray:
    """OOD_B(I) = 1 − Σ_c (1 − p_c^no)·p_c for each row of `f`.

    f: (N, D) image embeddings; g_yes, g_no: (C, D) concept yes/no text embeddings; all L2-normalised.
    Returns float64 (N,) in [0, 1]. Streams over concepts with a running max m, running
    S = Σ_c exp(logit_c − m) and A = Σ_c σ(logit_c − logit_c^no)·exp(logit_c − m), so that
    Σ_c (1 − p_c^no)·p_c = A / S; (1 − p^no_c) = σ(logit_c − logit^no_c).
    """
    f, g_yes, g_no = _check_unit("f", f), _check_unit("g_yes", g_yes), _check_unit("g_no", g_no)
    if g_yes.shape != g_no.shape:
        raise ValueError(f"yes/no embeddings differ in shape: {g_yes.shape} vs {g_no.shape}")
    if len(g_yes) == 0:
        raise ValueError("empty concept set")
    if f.shape[1] != g_yes.shape[1]:
        raise ValueError(f"image dim {f.shape[1]} != text dim {g_yes.shape[1]}")
    out = np.empty(len(f), np.float64)
    for i0 in range(0, len(f), image_chunk):
        fi = f[i0:i0 + image_chunk]
        m = np.full(len(fi), -np.inf)                       # running max of logit over concepts
        S = np.zeros(len(fi))                               # Σ exp(logit − m)
        A = np.zeros(len(fi))                               # Σ σ(logit − logit^no)·exp(logit − m)
        for c0 in range(0, len(g_yes), concept_chunk):
            ly = scale * (fi @ g_yes[c0:c0 + concept_chunk].T)          # (n, k) logit_c
            ln = scale * (fi @ g_no[c0:c0 + concept_chunk].T)           # (n, k) logit_c^no
            m_new = np.maximum(m, ly.max(axis=1).astype(np.float64))
            rescale = np.exp(m - m_new)                                  # 0 on the first chunk
            e = np.exp(ly - m_new[:, None].astype(np.float32))         # (n, k) ≤ 1
            with np.errstate(over="ignore"):                            # exp(+big) = inf → σ = 0
                yes = 1.0 / (1.0 + np.exp(ln - ly))                     # 1 − p_c^no = σ(logit − logit^no)
            S = S * rescale + e.sum(axis=1, dtype=np.float64)
            A = A * rescale + (yes * e).sum(axis=1, dtype=np.float64)
            m = m_new
        out[i0:i0 + len(fi)] = 1.0 - A / S
    return np.clip(out, 0.0, 1.0)


def ensemble(per_template: Iterable[np.ndarray]) -> np.ndarray:
    """Prompt ensemble as CLIPN: Σ_t normalise(e_t) then normalise. Input: iterable of (C, D)."""
    total = None
    for e in per_template:
        e = np.asarray(e, np.float64)
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        total = e if total is None else total + e
    if total is None:
        raise ValueError("no templates")
    return (total / np.maximum(np.linalg.norm(total, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def concept_embeddings(encode: Callable[[list[str]], np.ndarray], concepts: Sequence[str],
                       templates: Sequence[str]) -> np.ndarray:
    """(C, D) ensembled text embeddings of `concepts` under `templates` with encoder `encode`."""
    return ensemble(encode([t.format(c) for c in concepts]) for t in templates)


def derive_generalized_concepts(name: str, description: str = "") -> list[str]:
    """B' from the domain when params give none: the domain name, the description, and the phrases
    of the description split at commas/semicolons/"and"/"or" (≤ 6 words each), first occurrence kept.

    e.g. ("food", "dishes, drinks and desserts") → ["food", "dishes, drinks and desserts",
    "dishes", "drinks", "desserts"]. Deterministic; set `ood.generalized_concepts` to override.
    """
    description = " ".join((description or "").split()).strip(" .")
    pieces = [p.strip(" .") for p in re.split(r"\s*(?:[,;/]|\band\b|\bor\b)\s*", description)]
    candidates = [" ".join(str(name).split()), description] + [p for p in pieces if len(p.split()) <= 6]
    out: list[str] = []
    for phrase in candidates:
        if phrase and phrase.lower() not in {o.lower() for o in out}:
            out.append(phrase)
    if not out:
        raise ParamsError("generalized_concepts: empty, and no domain name to derive B' from")
    return out


def three_scores(f: np.ndarray, f_blur: np.ndarray, has_text: np.ndarray, B: tuple[np.ndarray, np.ndarray],
                 B_prime: tuple[np.ndarray, np.ndarray], scale: float = 100.0,
                 concept_chunk: int = 1024, image_chunk: int = 4096) -> dict[str, np.ndarray]:
    """The paper's three metrics for N images.

    f: (N, D) embeddings of I; f_blur: (has_text.sum(), D) embeddings of I' for the images with text
    (rows in order); B, B_prime: (yes, no) embedding pairs. Images without text have I' = I, so their
    delta is exactly 0 and they are not encoded twice.
    """
    has_text = np.asarray(has_text, bool)
    if len(f_blur) != int(has_text.sum()):
        raise ValueError(f"{len(f_blur)} blurred embeddings for {int(has_text.sum())} images with text")
    kw = dict(scale=scale, concept_chunk=concept_chunk, image_chunk=image_chunk)
    ood_b = ood_scores(f, *B, **kw)
    delta = np.zeros(len(f))
    if len(f_blur):
        delta[has_text] = ood_scores(f_blur, *B, **kw) - ood_b[has_text]
    return {"ood_b": ood_b, "ood_bprime": ood_scores(f, *B_prime, **kw), "ood_blur_delta": delta}


# ---------------------------------------------------------------------------------------------
# images → scores (models loaded by the caller)

@dataclass
class TextSets:
    """Yes/no embeddings of the concept bank B and the generalised set B'."""

    B: tuple[np.ndarray, np.ndarray]
    B_prime: tuple[np.ndarray, np.ndarray]
    mode: str


def build_text_sets(clip: Any, concepts: Sequence[str], generalized: Sequence[str], params: OodParams,
                    no_encoder: Any | None = None) -> TextSets:
    """Encode B and B' once. With a CLIPN `no_encoder` the no-tower reads the yes templates (as CLIPN
    does); without one, the CLIP text tower reads the negative templates."""
    if not concepts:
        raise ValueError("empty concept bank: no accepted concepts to score against")
    yes_enc = lambda t: clip.encode_texts(t, batch_size=256)  # noqa: E731
    if no_encoder is not None:
        no_enc, no_templates, mode = (lambda t: no_encoder.encode_texts(t, batch_size=256)), \
            params.yes_templates, getattr(no_encoder, "mode", "clipn")
    else:
        no_enc, no_templates, mode = yes_enc, params.no_templates, "negative_prompts"

    def pair(cs: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return (concept_embeddings(yes_enc, cs, params.yes_templates),
                concept_embeddings(no_enc, cs, no_templates))

    return TextSets(B=pair(concepts), B_prime=pair(generalized), mode=mode)


@dataclass
class PromptEncoding:
    """B and B' encoded once, with what the metrics report about the models that encoded them."""

    texts: TextSets
    logit_scale: float
    clipn_base_match: bool | None
    seconds: float

    def info(self) -> dict:
        """What the metrics report (no arrays: it travels back from Ray actors with every shard)."""
        return {"mode": self.texts.mode, "logit_scale": self.logit_scale,
                "clipn_base_match": self.clipn_base_match, "seconds": self.seconds}


def encode_prompts(clip_dir: str, params: OodParams, concepts: Sequence[str], generalized: Sequence[str],
                   clip: Any = None, clipn_checkpoint: str | None = None) -> PromptEncoding:
    """Load CLIP from `clip_dir` (unless `clip` is given) and its no-tower — CLIPN's from
    `clipn_checkpoint` (then `clip_dir` is CLIPN's base), else the trained no head saved beside the CLIP
    (`pas.models.no_head`, the offline CLIP's), else none (negative prompts) — and encode B and B'
    (`build_text_sets`)."""
    if clip is None:
        from pas.models.clip import load_clip

        clip = load_clip(clip_dir, device=params.device)
    if clipn_checkpoint:
        from pas.models.clipn import load_clipn_no_encoder

        no_encoder = load_clipn_no_encoder(clipn_checkpoint, clip)
    else:
        from pas.models.no_head import load_no_head

        head = load_no_head(clip_dir)
        no_encoder = head.bind(clip) if head is not None else None
    t = time.perf_counter()
    texts = build_text_sets(clip, concepts, generalized, params, no_encoder)
    return PromptEncoding(texts=texts, logit_scale=clip.logit_scale,
                          clipn_base_match=getattr(no_encoder, "base_match", None),
                          seconds=time.perf_counter() - t)


@dataclass
class Timings:
    clip_s: float = 0.0        # image encoding (I and I')
    detect_s: float = 0.0      # text detection
    blur_s: float = 0.0
    score_s: float = 0.0
    n_images: int = 0
    n_encoded: int = 0         # CLIP forward passes (images + blurred images)

    def add(self, other: "Timings") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def score_images(images: Sequence, clip: Any, detector: Any, texts: TextSets, params: OodParams,
                 timings: Timings | None = None) -> dict[str, np.ndarray]:
    """ood_b, ood_bprime, ood_blur_delta and text_boxes (count) for a batch of PIL images."""
    from pas.curate.textblur import blur_regions

    t = timings if timings is not None else Timings()
    t0 = time.perf_counter()
    boxes = [detector.detect(im) for im in images]
    t1 = time.perf_counter()
    has_text = np.array([len(b) > 0 for b in boxes], bool)
    blurred = [blur_regions(im, b, params.blur_kind, params.blur_radius)
               for im, b in zip(images, boxes) if len(b)]
    t2 = time.perf_counter()
    f = clip.encode_images(list(images), batch_size=params.batch_size)
    f_blur = clip.encode_images(blurred, batch_size=params.batch_size) if blurred else f[:0]
    t3 = time.perf_counter()
    out = three_scores(f, f_blur, has_text, texts.B, texts.B_prime, scale=clip.logit_scale,
                       concept_chunk=params.concept_chunk, image_chunk=params.image_chunk)
    t4 = time.perf_counter()
    out["text_boxes"] = np.array([len(b) for b in boxes], np.int32)
    t.detect_s += t1 - t0
    t.blur_s += t2 - t1
    t.clip_s += t3 - t2
    t.score_s += t4 - t3
    t.n_images += len(images)
    t.n_encoded += len(images) + len(blurred)
    return out


# ---------------------------------------------------------------------------------------------
# shards → scores, one shard at a time with a resume marker per shard

SCORE_COLUMNS = ("key", "source", "ood_b", "ood_bprime", "ood_blur_delta", "text_boxes")


def run_fingerprint(params: OodParams, models: dict[str, str], concepts: Sequence[str],
                    generalized: Sequence[str]) -> str:
    """What every shard's scores depend on besides the shard itself: params (device and batch sizes
    excluded), model fingerprints (the CLIP used, the CLIPN checkpoint's sha256, the detector), B and B'."""
    p = dataclasses.asdict(params)
    for k in ("device", "batch_size", "concept_chunk", "image_chunk", "threads"):
        p.pop(k)
    return sha256_json({"params": p, "models": models, "B": list(concepts), "B_prime": list(generalized)})


class OodScorer:
    """`score_images` with its models bound, for `score_shards`.

    It pickles as a spec (CLIP folder, prompts, params) without the loaded models, so whichever process
    the engine runs it in (this one, or a Ray actor) loads CLIP and the text detector once (`load`), on
    its own device, and encodes `prompts=(concepts, generalized)` once with that CLIP (Ray: once per
    actor, which loads CLIP anyway — encoding in the driver or a separate task loaded CLIP a second
    time, in series with the actors: benchmarks/RESULTS-engine.md). `prompt_info` then holds the
    encoding's metrics.
    """

    def __init__(self, clip_dir: str, params: OodParams, prompts: tuple[Sequence[str], Sequence[str]],
                 clipn_checkpoint: str | None = None):
        self.clip_dir, self.params, self.prompts = str(clip_dir), params, prompts
        self.clipn_checkpoint = clipn_checkpoint
        self.clip = self.detector = self.texts = None
        self.timings, self.prompt_info = Timings(), None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "clip": None, "detector": None, "timings": Timings()}

    def load(self) -> "OodScorer":
        if self.clip is None:
            from pas.models.clip import load_clip

            self.clip = load_clip(self.clip_dir, device=self.params.device)
        if self.detector is None:
            from pas.curate.textblur import TextDetector

            p = self.params
            self.detector = TextDetector(limit_side_len=p.det_limit_side_len, box_thresh=p.det_box_thresh,
                                         threads=p.threads)
        if self.texts is None:
            enc = encode_prompts(self.clip_dir, self.params, *self.prompts, clip=self.clip,
                                 clipn_checkpoint=self.clipn_checkpoint)
            self.texts, self.prompt_info = enc.texts, enc.info()
        return self

    def __call__(self, images: Sequence) -> dict[str, np.ndarray]:
        self.load()
        return score_images(images, self.clip, self.detector, self.texts, self.params, self.timings)


class _ShardScoring:
    """Engine work item → (shard scores DataFrame, Timings of that shard or None, the scorer's
    `prompt_info` or None). `__call__` is the `fn_factory` of `pas.engine.map_shards`: it loads the
    scorer's models once, where it runs."""

    def __init__(self, scorer: Callable[[list], dict], batch_size: int):
        self.scorer, self.batch_size = scorer, batch_size

    def __call__(self) -> Callable[[dict], tuple]:
        if hasattr(self.scorer, "load"):
            self.scorer.load()
        return self.score

    def score(self, item: dict) -> tuple:
        import pandas as pd
        from tqdm import tqdm

        from pas.io.shards import decode_image, iter_samples

        shard, keys = item["shard"], set(item["keys"])
        samples = [s for s in iter_samples(shard) if s.key in keys]
        t = getattr(self.scorer, "timings", None)
        before = dataclasses.replace(t) if isinstance(t, Timings) else None
        rows: dict[str, list] = {c: [] for c in SCORE_COLUMNS}
        for i in tqdm(range(0, len(samples), self.batch_size), desc=item["name"], unit="batch", leave=False):
            batch = samples[i:i + self.batch_size]
            pils = []
            for s in batch:
                try:
                    pils.append(decode_image(s.image))
                except Exception as e:  # noqa: BLE001 - report which sample, then stop
                    raise ValueError(f"{shard}: sample {s.key} does not decode: {e}") from None
            out = self.scorer(pils)
            rows["key"] += [s.key for s in batch]
            rows["source"] += [str(s.meta.get("source", "")) for s in batch]
            for c in SCORE_COLUMNS[2:]:
                rows[c] += out[c].tolist()
        df = pd.DataFrame(rows).astype({"ood_b": "float64", "ood_bprime": "float64",
                                        "ood_blur_delta": "float64", "text_boxes": "int32"})
        delta = None
        if before is not None:
            delta = Timings(**{f.name: getattr(t, f.name) - getattr(before, f.name)
                               for f in dataclasses.fields(Timings)})
        return df, delta, getattr(self.scorer, "prompt_info", None)


class _Scores(Table):
    """`pas.io.resume.WorkStore` codec of a scored shard: its rows as parquet; the marker keeps the
    row count and the scorer's `prompt_info`, so a run that resumes every shard still reports it. The
    shard's Timings are this run's only (None when resumed)."""

    def write(self, path, result: tuple) -> dict:
        df, _, info = result
        return {**super().write(path, df), "prompt_info": info}

    def read(self, path, stats: dict) -> tuple:
        return super().read(path, stats), None, stats.get("prompt_info")


def score_shards(image_dirs: Sequence[str], kept: set[str], scorer: Callable[[list], dict],
                 cache_dir: str, fingerprint: str, batch_size: int = 64, *, engine: Any = None,
                 timings: Timings | None = None, prompt_info: dict | None = None):
    """Score the kept samples of every shard of `image_dirs`; return (the scores DataFrame sorted by
    key, how many shards were resumed).

    Each shard's rows are kept in a `pas.io.resume.WorkStore` under `cache_dir`, identified by (run
    `fingerprint`, the shard's sha256, its kept keys), so a killed run resumes where it stopped; items
    of other inputs are deleted at the end. `scorer(pils) -> dict of arrays` is `score_images` with its
    models bound (an `OodScorer` for Ray). The shards left to score run on `engine` (a
    `pas.engine.EngineConfig`; default: PAS_ENGINE from the environment, `local`): same bytes either
    way. With `timings`, the Timings of the shards scored by this run are added to it (from whichever
    process ran them); with `prompt_info`, an empty dict gets the first `OodScorer.prompt_info` that
    comes back (Ray actors encode the prompts themselves), or that a resumed shard's marker kept.
    """
    import pandas as pd

    from pas.engine import map_resumable
    from pas.io.manifest import read_parquet
    from pas.io.shards import iter_samples, list_shards

    shards = [s for d in image_dirs for s in list_shards(d)]
    indexes = [Path(d) / "index.parquet" for d in image_dirs]
    if all(ix.is_file() for ix in indexes):          # fail before any scoring, not after hours of it
        indexed = set().union(*(set(read_parquet(ix)["key"].astype(str)) for ix in indexes))
        if kept - indexed:
            raise ValueError(f"{len(kept - indexed)} kept keys of the manifest are in none of "
                             f"{list(image_dirs)}, e.g. {sorted(kept - indexed)[:3]}")
    store = WorkStore(cache_dir, fingerprint, _Scores())
    # keys come from the shard itself, so a stored item is valid only for these exact bytes + kept set
    items = [{"shard": str(shard), "keys": sorted(s.key for s in iter_samples(shard) if s.key in kept),
              "name": f"{shard.parent.name}-{shard.stem}"} for shard in shards]
    ids = [[file_identity(it["shard"]), it["keys"]] for it in items]

    def finished(i: int, result: tuple) -> None:
        if timings is not None and result[1] is not None:
            timings.add(result[1])

    results = map_resumable(_ShardScoring(scorer, batch_size), items, ids, store, config=engine,
                            on_result=finished, desc="ood shards")
    store.prune()
    frames = [df for df, _, _ in results]
    if prompt_info is not None and not prompt_info:
        prompt_info.update(next((info for _, _, info in results if info), {}))
    seen: set = set()
    for shard, df in zip(shards, frames):
        dup = seen.intersection(df["key"])
        if dup:
            raise ValueError(f"{shard}: key {sorted(dup)[0]} appears in more than one shard")
        seen.update(df["key"])
    missing = kept - seen
    if missing:
        raise ValueError(f"{len(missing)} kept keys of the manifest are in none of {list(image_dirs)}, "
                         f"e.g. {sorted(missing)[:3]}")
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({c: [] for c in SCORE_COLUMNS})
    return df.sort_values("key", kind="stable").reset_index(drop=True), store.n_resumed
