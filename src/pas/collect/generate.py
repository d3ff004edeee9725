"""In-context in-domain image generation (paper §3.2): I_Synth = ⋃_{c∈B} ⋃_{t∈T_c} {i_t ~ S_I(t)}.

Each caption t of T_c (written by L4 in the `captions` stage, `pas.collect.captions`, read from its
out `data/captions/` with `pas.collect.caption_files`) is given to the text-to-image model S_I (a diffusers StableDiffusionPipeline from
the `models` stage), which draws N_Synth images per caption.

Determinism: image j of caption i of concept c starts from the latent noise of
`torch.Generator("cpu").manual_seed(derive_seed(seed, "image", c, i, j))`, recorded in its metadata, so
any image can be regenerated alone (up to float rounding of a different batch composition).

Resumable (a pure map over shards): the sorted work list is cut into shards of `shard_size` images.
Each shard is rendered into the scratch store `data/.cache/generate/shards/` (a
`pas.io.resume.WorkStore`, *not* a DVC out) under a hash of the model, the diffusion params and the
shard's (key, caption, seed) list, written to a temp name and renamed when complete, then marked done
by its stats file. A killed run resumes: finished shards are kept, the unfinished one is redone from
scratch. The DVC out `data/generated/` is then assembled from the finished shards (hard links, or
copies across file systems). Because DVC deletes its outs before rerunning a stage, the progress
lives in the scratch folder, which DVC never touches; the out itself is always complete and
byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

from pas.collect.caption_files import Captions, write_caption_files
from pas.hashing import sha256_json
from pas.models.diffusion import DTYPES, SCHEDULERS
from pas.params import ParamsError, check_choice, check_range, check_seed, renamed
from pas.seeds import derive_seed

log = logging.getLogger(__name__)
SHARD_PREFIX = "generated"
FORMAT_VERSION = 1   # bump when the bytes of a shard would change for the same inputs


@dataclass(frozen=True)
class DiffusionParams:
    """`diffusion:` — how S_I draws images (paper: SD 2.1; offline: tiny SD at 64 px)."""

    steps: int = 4                # denoising steps
    guidance: float = 7.5         # classifier-free guidance scale (≤ 1 disables guidance)
    resolution: int = 64          # output height = width in pixels (multiple of 8)
    scheduler: str = "ddim"       # ddim | pndm | euler | euler_a | dpm | lms
    batch_size: int = 16          # images per pipeline call
    dtype: str = "auto"           # auto (float16 on CUDA, float32 on CPU) | float32 | float16 | bfloat16
    device: str = "cpu"           # torch device, e.g. cuda
    vae_slicing: bool = False     # decode a batch's latents one image at a time (less VAE memory)
    vae_tiling: bool = False      # decode each image in overlapping tiles (768² at batch 32 on one GPU)
    jpeg_quality: int = 95        # stored JPEG quality
    threads: int = 0              # torch CPU threads (0 = torch default); 1 on a busy small machine,
    #                               where threads wait on each other (benchmarks/RESULTS-engine.md)

    REMOVED_KEYS: ClassVar[dict[str, str]] = {"cpu_threads": renamed("threads", " (0 = torch default, was null)")}

    def __post_init__(self) -> None:
        check_range("steps", self.steps, 1, None, lo_open=False)
        check_range("threads", self.threads, 0, None, lo_open=False)
        check_range("guidance", self.guidance, 0.0, None, lo_open=False)
        check_range("resolution", self.resolution, 8, None, lo_open=False)
        if self.resolution % 8:
            raise ParamsError(f"resolution={self.resolution} must be a multiple of 8 (VAE factor)")
        check_choice("scheduler", self.scheduler, sorted(SCHEDULERS))
        check_range("batch_size", self.batch_size, 1, None, lo_open=False)
        check_choice("dtype", self.dtype, DTYPES)
        check_range("jpeg_quality", self.jpeg_quality, 1, 100, lo_open=False, hi_open=False)


@dataclass(frozen=True)
class GenerateParams:
    """`generate:` (+ top-level n_synth, seed) — images per caption and work sharding (the captions'
    params are `captions:`, pas.collect.captions.CaptionsParams)."""

    n_synth: int = 35             # N_Synth: images per caption
    seed: int = 0
    shard_size: int = 1000        # images per work shard (= output shard, ≤ 10k); the unit of resume

    def __post_init__(self) -> None:
        check_range("n_synth", self.n_synth, 0, None, lo_open=False)
        check_seed("seed", self.seed)
        check_range("shard_size", self.shard_size, 1, 10_000, lo_open=False, hi_open=False)


@dataclass(frozen=True)
class Item:
    """One image to draw."""

    key: str
    concept: str
    caption_idx: int
    image_idx: int
    caption: str
    fallback: bool
    seed: int

    def meta(self) -> dict:
        return {"key": self.key, "source": "synthetic", "concept": self.concept, "caption": self.caption,
                "caption_idx": self.caption_idx, "image_idx": self.image_idx, "seed": self.seed,
                "fallback_caption": self.fallback}


def image_key(concept: str, caption_idx: int, image_idx: int) -> str:
    from pas.io.shards import make_key

    return make_key("g", concept, caption_idx, image_idx)


def plan(captions: Captions, n_synth: int, seed: int) -> list[Item]:
    """The work list, sorted by (concept, caption index, image index)."""
    items = []
    for c in sorted(captions.captions):
        for i, (cap, fb) in enumerate(captions.captions[c]):
            for j in range(n_synth):
                items.append(Item(image_key(c, i, j), c, i, j, cap, fb, derive_seed(seed, "image", c, i, j)))
    return items


def shards_of(items: Sequence[Item], shard_size: int) -> list[list[Item]]:
    return [list(items[i:i + shard_size]) for i in range(0, len(items), shard_size)]


def run_fingerprint(model_fp: str, d: DiffusionParams) -> str:
    """What, besides a shard's items, decides its bytes: model, params, code and library versions."""
    import diffusers
    import torch

    return sha256_json({"format": FORMAT_VERSION, "model": model_fp, "diffusion": dataclasses.asdict(d),
                        "torch": torch.__version__, "diffusers": diffusers.__version__}, ensure_ascii=True)


def shard_identity(items: Sequence[Item]) -> str:
    """What a shard draws: its (key, caption, seed, fallback) list, hashed."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.key, it.caption, it.seed, it.fallback], ensure_ascii=False).encode("utf-8",
                                                                                                  "surrogatepass"))
    return h.hexdigest()


def generate_images(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], d: DiffusionParams) -> list:
    """One pipeline call: prompts[i] drawn from the latent noise of CPU generator seeds[i]."""
    import torch

    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    with torch.inference_mode():
        out = pipe(list(prompts), num_inference_steps=d.steps, guidance_scale=d.guidance,
                   height=d.resolution, width=d.resolution, generator=gens, output_type="pil")
    return out.images


def render_shard(pipe: Any, items: Sequence[Item], d: DiffusionParams, tar_path: Path) -> None:
    """Draw a shard's images in batches of d.batch_size and write them to `tar_path` atomically."""
    from pas.io.shards import ShardWriter, encode_image

    tmp = tar_path.parent / f".tmp-{tar_path.stem}"
    if tmp.exists():
        shutil.rmtree(tmp)
    with ShardWriter(tmp, prefix="part", maxcount=max(1, len(items))) as w:
        for b in range(0, len(items), d.batch_size):
            batch = items[b:b + d.batch_size]
            images = generate_images(pipe, [it.caption for it in batch], [it.seed for it in batch], d)
            for it, im in zip(batch, images):
                w.write(it.key, encode_image(im, "jpg", d.jpeg_quality), it.meta())
    os.replace(tmp / "part-000000.tar", tar_path)
    shutil.rmtree(tmp)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (no extra disk; files are only ever replaced, never written in place) or copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class _RenderShards:
    """`pas.engine.map_resumable` work: render one shard to its tar in the store and return its stats.
    Pickles without the pipeline; each Ray actor loads it once (`num_gpus` per actor from
    PAS_RAY_NUM_GPUS_PER_ACTOR). The tar is written to a temp name and renamed when complete, so a
    killed actor leaves no half shard behind and Ray's retry redraws it from scratch."""

    def __init__(self, model_dir: str | Path, d: DiffusionParams, pipe: Any = None):
        self.model_dir, self.d, self.pipe = str(model_dir), d, pipe

    def __getstate__(self) -> dict:
        return {**self.__dict__, "pipe": None}

    def __call__(self):
        if self.pipe is None:
            from pas.models.diffusion import load_pipeline

            if self.d.threads > 0 and self.d.device == "cpu":
                import torch
                torch.set_num_threads(self.d.threads)
            self.pipe = load_pipeline(self.model_dir, self.d.device, self.d.dtype, self.d.scheduler,
                                      vae_slicing=self.d.vae_slicing, vae_tiling=self.d.vae_tiling)
        return self.run

    def run(self, work: tuple[str, list[Item]]) -> dict:
        tar, shard = work
        t0 = time.perf_counter()
        render_shard(self.pipe, shard, self.d, Path(tar))
        secs = time.perf_counter() - t0
        log.info("generate: shard of %s done, %d images in %.1f s (%.1f img/s)", shard[0].key, len(shard),
                 secs, len(shard) / max(secs, 1e-9))
        return {"n": len(shard), "seconds": round(secs, 3), "first_key": shard[0].key}


def generate_shards(items: Sequence[Item], model_dir: str | Path, cache_dir: str | Path,
                    d: DiffusionParams, shard_size: int, progress: bool = True,
                    engine: Any = None) -> tuple[dict, list[Path]]:
    """Render every unfinished shard into the store `cache_dir/shards/`; returns (counts and timings,
    the shards' tars in order).

    The shards left to draw run on `engine` (`pas.engine.EngineConfig`, default PAS_ENGINE): in this
    process, or one shard per task on a Ray actor pool (each actor loads the pipeline once; the scratch
    folder must be on a file system the actors share). A shard is marked done here as soon as it
    is drawn, so a crash on either engine redraws only unfinished shards. The pipeline is loaded only if
    some shard needs drawing.
    """
    from pas.engine import map_resumable
    from pas.io.resume import WorkStore, WrittenFile
    from pas.models.diffusion import fingerprint as model_fingerprint

    shards = shards_of(items, shard_size)
    store = WorkStore(Path(cache_dir) / "shards", run_fingerprint(model_fingerprint(model_dir), d),
                      WrittenFile(".tar"))
    ids = [shard_identity(shard) for shard in shards]
    tars = [store.path(i) for i in ids]
    drawn = {"images_generated": 0, "seconds_generating": 0.0}

    def done(i: int, res: dict) -> None:              # a shard drawn by this run
        drawn["images_generated"] += res["n"]
        drawn["seconds_generating"] += res["seconds"]

    results = map_resumable(_RenderShards(model_dir, d), [(str(t), s) for t, s in zip(tars, shards)], ids,
                            store, config=engine, on_result=done, desc="generate shards", progress=progress)
    store.prune()                       # shards of an earlier plan or model
    return {"n_shards": len(shards), "n_shards_resumed": store.n_resumed,
            "n_shards_generated": len(shards) - store.n_resumed, **drawn,
            # as recorded by the run that drew each shard (stable across resumes)
            "seconds_per_image": sum(r["seconds"] for r in results) / len(items)}, tars


def assemble(items: Sequence[Item], captions: Captions, tars: Sequence[Path], out_dir: str | Path,
             shard_size: int) -> list[dict]:
    """Fill the DVC out from finished shards: tars, index.parquet, captions.parquet, captions_raw.jsonl."""
    import pandas as pd

    from pas.io.shards import clean_out, write_index as write_shard_index

    out = Path(out_dir)
    clean_out(out, SHARD_PREFIX, ("index.parquet", "captions.parquet", "captions_raw.jsonl"))
    rows = []
    for s, (shard, tar) in enumerate(zip(shards_of(items, shard_size), tars)):
        name = f"{SHARD_PREFIX}-{s:06d}.tar"
        _link_or_copy(tar, out / name)
        rows += [{"key": it.key, "shard": name, "source": "synthetic", "concept": it.concept,
                  "caption_idx": it.caption_idx, "image_idx": it.image_idx, "caption": it.caption,
                  "fallback_caption": it.fallback, "seed": it.seed} for it in shard]
    cols = ["key", "shard", "source", "concept", "caption_idx", "image_idx", "caption", "fallback_caption",
            "seed"]
    write_shard_index(pd.DataFrame(rows, columns=cols), out)
    # the captions the images were drawn from, beside them (a copy of the `captions` stage's out)
    write_caption_files(captions, out / "captions.parquet", out / "captions_raw.jsonl")
    return rows


def generate(captions: Captions, model_dir: str | Path, out_dir: str | Path, cache_dir: str | Path,
             p: GenerateParams, d: DiffusionParams, progress: bool = True, engine: Any = None) -> dict:
    """Draw n_synth images per caption (resumable, on `engine`), assemble `out_dir`; returns metrics."""
    items = plan(captions, p.n_synth, p.seed)
    stats, tars = generate_shards(items, model_dir, cache_dir, d, p.shard_size, progress, engine) if items else \
        ({"n_shards": 0, "n_shards_resumed": 0, "n_shards_generated": 0, "images_generated": 0,
          "seconds_generating": 0.0, "seconds_per_image": 0.0}, [])
    assemble(items, captions, tars, out_dir, p.shard_size)
    caps = {k: v for k, v in captions.metrics().items() if k != "n_requests"}
    return {**caps, "n_images": len(items), **stats}
