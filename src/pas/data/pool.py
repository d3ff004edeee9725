"""The image pool that `retrieve` searches (the paper's LAION-2B + clip-retrieval, here any folder).

`build_pool` turns a folder of images (`pool.format: folder`) or existing webdataset shards
(`pool.format: shards`) into
  pool-*.tar        webdataset shards of RGB JPEGs (+ json: key, source, path, category)
  index.parquet     key, shard, path, category, width, height (original), stored_width, stored_height
  embeddings.npy    CLIP image embeddings, float32, L2-normalised, rows in index order
  faiss.index       inner-product index over those rows
  skipped.parquet   path, reason, detail — every file that did not make it in
  pool.json         the CLIP fingerprint (retrieve refuses a pool made with another CLIP), sizes
It streams: images are decoded, written and embedded batch by batch, never all held in memory.
When retrieval uses a kNN service (`retrieve.backend: clip_service`) nothing searches the pool:
`unused_pool` writes pool.json + an empty index.parquet instead, reading neither pool.source nor CLIP.
A folder entry that is not a usable file (FIFO, dangling link, link loop, link out of the folder,
a name that is not UTF-8) is skipped with its reason; a pool of 0 images is an error.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from pas.data.chunks import IMAGE_SUFFIXES
from pas.params import ParamsError, check_choice, check_range

log = logging.getLogger(__name__)

FORMATS = ("folder", "shards")


class PoolError(ParamsError):
    """`pool.source` holds nothing to index (missing, empty, or in the other format): one line, exit 2."""


@dataclass(frozen=True)
class PoolParams:
    """params.yaml `pool:` section."""

    source: str = "/usr/share/openclipart/png"  # a folder of images, or a folder of .tar shards / one .tar
    # explicit, never guessed: one stray .tar must not turn an image folder into an empty shard pool
    format: str = "folder"          # folder: image files, category = sub-folder | shards: webdataset .tar
    follow_symlinks_outside: bool = False  # read links whose target lies outside `source` (else skipped)
    include: list[str] = field(default_factory=list)  # category prefixes to keep ([] = all)
    exclude: list[str] = field(default_factory=list)  # category prefixes to drop
    max_images: int = 0             # 0 = no limit (first N in sorted path order)
    max_pixels: int = 50_000_000    # header check before decoding: larger files are skipped
    max_side: int = 512             # stored images are downscaled to this longer side
    min_side: int = 16              # smaller images are skipped
    jpeg_quality: int = 95
    shard_maxcount: int = 10_000
    batch_size: int = 64            # CLIP batch
    index: str = "flat"             # faiss index: flat (exact) | ivf | hnsw
    nlist: int = 1024               # ivf lists (capped at N/39 for small pools)
    hnsw_m: int = 32
    device: str = "cpu"
    workers: int = 0                # decode processes; 0 = all cores (machine setting, output is identical)

    def __post_init__(self):
        check_choice("index", self.index, ("flat", "ivf", "hnsw"))
        check_choice("format", self.format, FORMATS)
        check_range("max_pixels", self.max_pixels, 1, None, lo_open=False)
        check_range("max_side", self.max_side, 16, None, lo_open=False)
        check_range("shard_maxcount", self.shard_maxcount, 1, 10_000, lo_open=False, hi_open=False)
        check_range("jpeg_quality", self.jpeg_quality, 1, 100, lo_open=False, hi_open=False)
        check_range("batch_size", self.batch_size, 1, None, lo_open=False)
        check_range("max_images", self.max_images, 0, None, lo_open=False)
        check_range("min_side", self.min_side, 1, None, lo_open=False)
        check_range("nlist", self.nlist, 1, None, lo_open=False)
        check_range("hnsw_m", self.hnsw_m, 2, None, lo_open=False)
        check_range("workers", self.workers, 0, None, lo_open=False)
        if not self.source:
            raise ParamsError("source: must name a folder of images or webdataset shards")


def category_of(rel: Path) -> str:
    """Folder layout gives the category: `food/fruit/apple.png` → `food/fruit`."""
    return rel.parent.as_posix() if rel.parent != Path(".") else ""


def _keep_category(cat: str, include: list[str], exclude: list[str]) -> bool:
    def under(prefix: str) -> bool:
        return cat == prefix or cat.startswith(prefix.rstrip("/") + "/")

    if include and not any(under(p) for p in include):
        return False
    return not any(under(p) for p in exclude)


def shown(rel: str) -> str:
    """A path as text that can be written anywhere: undecodable bytes of a file name as `\\xNN`."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def entry_problem(f: Path, root_real: Path, follow_outside: bool) -> str | None:
    """Why folder entry `f` cannot be read as an image file: None for a regular file (or a link to one
    inside the pool), "" for a directory (not an entry), else the skip reason. Never opens `f`: a FIFO
    would block the read forever."""
    try:
        str(f).encode("utf-8")
    except UnicodeEncodeError:  # a name that is not UTF-8 cannot go into shard JSON or parquet
        return "bad_filename"
    try:
        st = f.lstat()
        if stat.S_ISLNK(st.st_mode):
            try:
                st = f.stat()
            except FileNotFoundError:
                return "dangling_link"
            except OSError as e:
                return "symlink_loop" if e.errno == errno.ELOOP else "unreadable"
            if not follow_outside and not f.resolve().is_relative_to(root_real):
                return "symlink_outside"
    except OSError:
        return "unreadable"
    if stat.S_ISDIR(st.st_mode):
        return ""
    return None if stat.S_ISREG(st.st_mode) else "not_a_file"   # FIFO, socket, device


def list_image_files(root: Path, p: PoolParams, skipped: list[dict] | None = None) -> list[Path]:
    """Image files under `root` in sorted path order, filtered by category and cut at `max_images`.
    Entries named like images that are not readable files are appended to `skipped` instead."""
    root_real = root.resolve()
    files: list[Path] = []
    for f in sorted(root.rglob("*")):
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        rel = f.relative_to(root)
        if not _keep_category(category_of(rel), p.include, p.exclude):
            continue
        reason = entry_problem(f, root_real, p.follow_symlinks_outside)
        if reason is None:
            files.append(f)
            if p.max_images and len(files) >= p.max_images:
                break
        elif reason and skipped is not None:
            skipped.append({"path": shown(rel.as_posix()), "reason": reason, "detail": _link_detail(f)})
    return files


# entries DVC itself cannot hash when `pool.source` is a stage dep: a FIFO blocks it forever, a
# dangling link or a loop fails it, all before pas runs (see README, "When things fail")
DVC_BLOCKERS = ("not_a_file", "dangling_link", "symlink_loop")


def check_source(p: PoolParams) -> list[dict]:
    """Every entry under a folder `p.source` (any name, not only images) that the pool would skip
    for what it is rather than for its pixels: {path, reason, detail}, in path order. Opens nothing."""
    root = Path(p.source)
    if not root.is_dir():
        return []
    root_real = root.resolve()
    out = []
    for f in sorted(root.rglob("*")):
        reason = entry_problem(f, root_real, p.follow_symlinks_outside)
        if reason:
            out.append({"path": shown(f.relative_to(root).as_posix()), "reason": reason,
                        "detail": _link_detail(f)})
    return out


def _link_detail(f: Path) -> str:
    try:
        return shown(f"-> {os.readlink(f)}") if f.is_symlink() else ""
    except OSError:
        return ""


@dataclass
class _Item:
    key: str
    path: str
    category: str
    width: int
    height: int
    image: object         # PIL RGB, as stored (decoded from `jpeg`)
    jpeg: bytes | None = None  # the stored bytes, when already encoded
    caption: str = ""     # the source's alt text (webdataset pools), "" for image folders
    rotated: bool = False  # turned upright by its EXIF orientation (width/height are the upright ones)


def _load_one(args: tuple[str, str, PoolParams]) -> tuple:
    """Worker: decode one file safely and re-encode it as the JPEG we store (runs in a process pool)."""
    from PIL import Image

    from pas.data.images import BadImage, load_rgb
    from pas.io.shards import encode_image

    path, rel, p = args
    try:
        with Image.open(path) as head:
            w, h = head.size
    except Exception:  # noqa: BLE001 - load_rgb below reports it with a reason
        w = h = 0
    try:
        img = load_rgb(path, max_pixels=p.max_pixels, max_side=p.max_side, min_side=p.min_side)
    except BadImage as e:
        return rel, None, e.reason, e.detail
    orientation = img.info.get("exif_orientation", 1)
    if orientation >= 5:  # EXIF 5-8 turn by 90°: the header's size is the sideways one
        w, h = h, w
    return rel, (w, h, orientation != 1, encode_image(img, "jpg", p.jpeg_quality)), None, None


def _iter_folder(root: Path, p: PoolParams, skipped: list[dict]) -> Iterator[_Item]:
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    from pas.io.shards import decode_image, make_key

    files = list_image_files(root, p, skipped)
    log.info("pool: %d image files under %s", len(files), root)
    jobs = [(str(f), f.relative_to(root).as_posix(), p) for f in files]
    workers = p.workers or os.cpu_count() or 1
    # Decoding big PNGs dominates: spread it over processes; `map` keeps the sorted file order.
    with ProcessPoolExecutor(workers) if workers > 1 else _Inline() as ex:
        results = ex.map(_load_one, jobs, chunksize=16) if workers > 1 else map(_load_one, jobs)
        for rel, ok, reason, detail in tqdm(results, total=len(jobs), desc="pool", unit="img", mininterval=2):
            if ok is None:
                skipped.append({"path": rel, "reason": reason, "detail": detail})
                continue
            w, h, rotated, jpeg = ok
            yield _Item(make_key("p", rel), rel, category_of(Path(rel)), w, h, decode_image(jpeg), jpeg,
                        rotated=rotated)


class _Inline:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _iter_shards(src: Path, p: PoolParams, skipped: list[dict]) -> Iterator[_Item]:
    """Re-index existing webdataset shards (e.g. a LAION subset written by img2dataset)."""
    from tqdm import tqdm

    import io

    from PIL import Image

    from pas.data.images import BadImage, to_rgb_on_white, upright
    from pas.io.shards import KEY_RE, decode_image, encode_image, iter_samples, make_key

    n = 0
    for s in tqdm(iter_samples(src), desc="pool", unit="img", mininterval=2):
        ref = f"{s.shard}/{s.key}"
        cat = str(s.meta.get("category", ""))
        try:
            try:  # tar member names decode with surrogateescape; the JSON may hold lone surrogates
                ref.encode("utf-8"), cat.encode("utf-8")
            except UnicodeEncodeError:
                raise BadImage("bad_filename", shown(ref)) from None
            try:
                im = Image.open(io.BytesIO(s.image))
            except Exception as e:  # noqa: BLE001 - Pillow raises many types for non-images
                raise BadImage("unreadable", f"{ref}: {e}") from None
            w, h = im.size
            if w * h > p.max_pixels:
                raise BadImage("too_large", f"{ref}: {w}x{h}")
            if min(w, h) < p.min_side:
                raise BadImage("too_small", f"{ref}: {w}x{h}")
            try:
                im.load()
                im, orientation = upright(im)
                img = to_rgb_on_white(im)
            except Exception as e:  # noqa: BLE001
                raise BadImage("corrupt", f"{ref}: {e}") from None
        except BadImage as e:
            skipped.append({"path": shown(ref), "reason": e.reason, "detail": e.detail})
            continue
        if orientation >= 5:  # EXIF 5-8 turn by 90°
            w, h = h, w
        if max(img.size) > p.max_side:
            img.thumbnail((p.max_side, p.max_side))
        if not _keep_category(cat, p.include, p.exclude):
            continue
        key = s.key if KEY_RE.match(s.key) and s.key.startswith("p") else make_key("p", ref)
        # embed the stored JPEG, as for folder input: the embedding describes the bytes retrieve serves
        jpeg = encode_image(img, "jpg", p.jpeg_quality)
        yield _Item(key, ref, cat, w, h, decode_image(jpeg), jpeg, str(s.meta.get("caption") or ""),
                    rotated=orientation != 1)
        n += 1
        if p.max_images and n >= p.max_images:
            return


def iter_pool(p: PoolParams, skipped: list[dict]) -> Iterator[_Item]:
    """The pool's images in stored order, decoded as the pool stage stores them; bad files are
    appended to `skipped` ({path, reason, detail}). Also read by the offline model training."""
    src = Path(p.source)
    if not src.exists():
        raise PoolError(f"pool.source={p.source!r} does not exist "
                        "(offline default: `apt-get install openclipart-png`)")
    if p.format == "shards":
        if not (src.suffix == ".tar" and src.is_file()) and not (src.is_dir() and any(src.glob("*.tar"))):
            raise PoolError(f"pool.source={p.source!r}: no .tar shards there (pool.format: shards)")
        return _iter_shards(src, p, skipped)
    if not src.is_dir():
        raise PoolError(f"pool.source={p.source!r} is not a folder (pool.format: folder; "
                        "a .tar needs pool.format: shards)")
    return _iter_folder(src, p, skipped)


def _no_images(p: PoolParams, skipped: list[dict]) -> PoolError:
    """The error for a pool that came out empty, saying what was there instead."""
    src = Path(p.source)
    why = [f"{n} {r}" for r, n in sorted(Counter(s["reason"] for s in skipped).items())]
    tars = len(list(src.glob("*.tar"))) if p.format == "folder" and src.is_dir() else 0
    if tars:
        why.append(f"{tars} .tar files there: set pool.format: shards to read them")
    elif p.include or p.exclude:
        why.append(f"include={p.include} exclude={p.exclude}")
    return PoolError(f"pool.source={p.source!r} (format {p.format}): 0 images to index"
                     + (f" ({'; '.join(why)})" if why else " (no image files)"))


POOL_INDEX_COLUMNS = ["key", "shard", "path", "category", "width", "height", "stored_width", "stored_height"]


def unused_pool(out_dir: str | Path, reason: str) -> dict:
    """The pool folder when nothing searches it: pool.json saying why and an empty index.parquet
    (what `precision` reads), no shards, no faiss index (a `pool` retrieval refuses it). Returns
    the stage metrics."""
    from pas.io.shards import write_index
    from pas.models.files import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in ("embeddings.npy", "faiss.index", "skipped.parquet", "index.parquet"):
        (out / f).unlink(missing_ok=True)
    for f in out.glob("pool-*.tar"):
        f.unlink()
    write_index(pd.DataFrame(columns=POOL_INDEX_COLUMNS), out)
    write_json(out / "pool.json", {"n": 0, "unused": reason})
    log.info("pool: nothing indexed (%s)", reason)
    return {"n_files": 0, "n_indexed": 0, "n_skipped": 0, "unused": reason}


def build_faiss_index(emb: np.ndarray, p: PoolParams):
    """Inner-product index over L2-normalised rows (cosine). Exact by default."""
    import faiss

    n, d = emb.shape
    if p.index == "flat" or n < 10_000:
        index = faiss.IndexFlatIP(d)
    elif p.index == "ivf":
        nlist = max(1, min(p.nlist, n // 39))  # faiss wants ≥ 39 training points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(emb)
        index.nprobe = min(32, nlist)
    else:
        index = faiss.IndexHNSWFlat(d, p.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    if n:
        index.add(emb)
    return index


class ShardEmbeddings:
    """`pas.engine.map_shards` work: CLIP embeddings of one written pool shard, in stored order, in
    batches of `batch_size` counted from the shard's first image (the plan `build_pool` uses locally,
    so both engines give the same bytes). Pickles without the model; a Ray actor loads CLIP once."""

    def __init__(self, clip_dir: str | Path, device: str, batch_size: int, clip=None):
        self.clip_dir, self.device, self.batch_size, self.clip = str(clip_dir), device, batch_size, clip

    def __getstate__(self) -> dict:
        return {**self.__dict__, "clip": None}

    def __call__(self):
        if self.clip is None:
            from pas.models.clip import load_clip

            self.clip = load_clip(self.clip_dir, device=self.device)
        return self.run

    def run(self, shard: str) -> np.ndarray:
        from pas.io.shards import iter_samples

        parts, batch = [], []
        for s in iter_samples(shard):
            batch.append(s.pil())
            if len(batch) == self.batch_size:
                parts.append(self.clip.encode_images(batch, batch_size=self.batch_size))
                batch = []
        if batch:
            parts.append(self.clip.encode_images(batch, batch_size=self.batch_size))
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def build_pool(p: PoolParams, clip, out_dir: str | Path, clip_dir: str | Path | None = None,
               engine=None) -> dict:
    """Index `p.source` into `out_dir`; returns the stage metrics. `clip` is a loaded
    `pas.models.clip.Clip` (or None with `clip_dir`, the folder it comes from).

    Decoding runs in a local process pool; embedding runs on `engine` (`pas.engine.EngineConfig`,
    default PAS_ENGINE): `local` embeds while the shards are written, `ray` embeds the written shards
    on an actor pool (one shard per task) afterwards. Batches restart at every shard, so the bytes
    are the same either way."""
    import faiss

    from pas.engine import EngineConfig, map_shards
    from pas.io.manifest import write_parquet
    from pas.io.shards import write_index as write_shard_index
    from pas.io.shards import ShardWriter, encode_image
    from pas.models.files import fingerprint_dir, write_json

    engine = EngineConfig.from_env() if engine is None else engine
    if clip is None and clip_dir is None:
        raise ValueError("build_pool needs a loaded clip or clip_dir")
    on_ray = engine.engine != "local"
    if clip is None and not on_ray:
        from pas.models.clip import load_clip

        clip = load_clip(clip_dir, device=p.device)
    t0 = time.time()
    skipped: list[dict] = []
    items = iter_pool(p, skipped)   # checks the source before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # an index left by an earlier run would fail the check of the shards embedded before it is rewritten
    (out / "index.parquet").unlink(missing_ok=True)

    rows, embs, batch = [], [], []
    n_rotated = 0
    batch_shard = None

    def flush():
        if batch:
            embs.append(clip.encode_images([b.image for b in batch], batch_size=p.batch_size))
            batch.clear()

    seen: set[str] = set()
    with ShardWriter(out, prefix="pool", maxcount=p.shard_maxcount) as w:
        for it in items:
            if it.key in seen:  # same file twice in shard input
                skipped.append({"path": it.path, "reason": "duplicate_key", "detail": it.key})
                continue
            seen.add(it.key)
            n_rotated += it.rotated
            jpeg = it.jpeg if it.jpeg is not None else encode_image(it.image, "jpg", p.jpeg_quality)
            shard = w.write(it.key, jpeg,
                            {"source": "pool", "path": it.path, "category": it.category})
            rows.append({"key": it.key, "shard": shard, "path": it.path, "category": it.category,
                         "width": it.width, "height": it.height,
                         "stored_width": it.image.width, "stored_height": it.image.height})
            if on_ray:
                continue
            if shard != batch_shard:        # batches never span shards (the plan Ray uses too)
                flush()
                batch_shard = shard
            batch.append(it)
            if len(batch) >= p.batch_size:
                flush()
        flush()
    if not rows:
        raise _no_images(p, skipped)

    if on_ray and rows:
        shards = list(dict.fromkeys(r["shard"] for r in rows))
        embs = map_shards(ShardEmbeddings(clip_dir, p.device, p.batch_size), [str(out / s) for s in shards],
                          config=engine, desc="pool embeddings")
    fp = clip.fingerprint if clip is not None else fingerprint_dir(clip_dir)
    emb = np.concatenate(embs)      # rows is not empty, so neither is embs
    dim = int(emb.shape[1])
    if len(emb) != len(rows):
        raise RuntimeError(f"pool: {len(emb)} embeddings for {len(rows)} stored images")
    np.save(out / "embeddings.npy", emb.astype(np.float32))
    faiss.write_index(build_faiss_index(emb, p), str(out / "faiss.index"))
    # rows are already in shard order == embedding order; keep that order in the index file
    write_shard_index(pd.DataFrame(rows, columns=POOL_INDEX_COLUMNS), out, sort_by=None)
    write_parquet(pd.DataFrame(skipped, columns=["path", "reason", "detail"]), out / "skipped.parquet",
                  sort_by="path")
    write_json(out / "pool.json", {"clip_fingerprint": fp, "n": len(rows), "dim": dim,
                                   "index": p.index, "source": str(p.source)})
    secs = time.time() - t0
    reasons = Counter(s["reason"] for s in skipped)
    metrics = {"n_files": len(rows) + len(skipped), "n_indexed": len(rows), "n_skipped": len(skipped),
               **{f"skipped_{r}": n for r, n in sorted(reasons.items())}, "n_exif_rotated": n_rotated,
               "n_shards": len({r["shard"] for r in rows}), "dim": dim,
               "categories": len({r["category"] for r in rows}),
               "seconds": round(secs, 1), "images_per_second": round(len(rows) / max(secs, 1e-9), 1)}
    log.info("pool: indexed %d images, skipped %d %s in %.1fs (embeddings on %s)", len(rows), len(skipped),
             dict(reasons), secs, engine.engine)
    return metrics
