"""The image pool that `retrieve` searches (the paper's LAION-2B + clip-retrieval, here any folder).

`build_pool` turns a folder of images (`pool.format: folder`) or existing webdataset shards
(`pool.format: shards`) into
  pool-*.tar        webdataset shards of RGB JPEGs (+ json: key, source, path, category)
  index.parquet     key, shard, path, category, width, height (original), stored_width, stored_height
  embeddings.npy    CLIP image embeddings, float32, L2-normalised, rows in index order
  faiss.index       inner-product index over those rows
  skipped.parquet   path, reason, detail — every file that did not make it in
  pool.json         the CLIP fingerprint (retrieve refuses a pool made with another CLIP), sizes
It streams: the sorted input is cut into chunks of CHUNK entries, decoded in worker processes, then
written and embedded chunk by chunk in input order, never all held in memory. Each finished chunk can
be kept in a resume cache keyed by its files' bytes (`build_pool(cache_dir=...)`), so a killed run
redoes only what it had not finished.
When retrieval uses a kNN service (`retrieve.backend: clip_service`) nothing searches the pool:
`unused_pool` writes pool.json + an empty index.parquet instead, reading neither pool.source nor CLIP.
A folder entry that is not a usable file (FIFO, dangling link, link loop, link out of the folder,
a name that is not UTF-8) is skipped with its reason; a pool of 0 images is an error.
"""

from __future__ import annotations

import errno
import json
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
from pas.params import ParamsError, check_choice, check_range, renamed

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
    shard_size: int = 10_000        # images per output shard (<= 10k)
    batch_size: int = 64            # CLIP batch
    index: str = "flat"             # faiss index: flat (exact) | ivf | hnsw
    nlist: int = 1024               # ivf lists (capped at N/39 for small pools)
    hnsw_m: int = 32
    device: str = "cpu"
    workers: int = 0                # decode processes; 0 = all cores. A machine setting (same bytes for any
    #                                 value), so not in params.yaml: the stage takes it from PAS_POOL_WORKERS

    # DVC reruns a stage when a declared param changes; a knob that changes no byte must not be one
    REMOVED_KEYS = {"workers": "decode processes are a machine setting: set PAS_POOL_WORKERS (0 = every core)",
                    "shard_maxcount": renamed("pool.shard_size")}

    def __post_init__(self):
        check_choice("index", self.index, ("flat", "ivf", "hnsw"))
        check_choice("format", self.format, FORMATS)
        check_range("max_pixels", self.max_pixels, 1, None, lo_open=False)
        check_range("max_side", self.max_side, 16, None, lo_open=False)
        check_range("shard_size", self.shard_size, 1, 10_000, lo_open=False, hi_open=False)
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


def list_image_files(root: Path, p: PoolParams, skipped: list[dict]) -> list[Path]:
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
        elif reason:
            skipped.append(_skipped_entry(root, f, reason))
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
    return [_skipped_entry(root, f, reason) for f in sorted(root.rglob("*"))
            if (reason := entry_problem(f, root_real, p.follow_symlinks_outside))]


def _skipped_entry(root: Path, f: Path, reason: str) -> dict:
    """The skipped row of folder entry `f`: its path under `root`, `reason`, where a link points."""
    try:
        detail = shown(f"-> {os.readlink(f)}") if f.is_symlink() else ""
    except OSError:
        detail = ""
    return {"path": shown(f.relative_to(root).as_posix()), "reason": reason, "detail": detail}


CHUNK = 256   # input entries per work item: one decode task, one resume file; CLIP batches restart at each


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


def plan_chunks(p: PoolParams, skipped: list[dict]) -> list[tuple]:
    """`p.source` cut into work items of ≤ CHUNK input entries in stored order (`pas.data.chunks`
    items): ("files", source, [relative path, ...]) for a folder (entries that are no readable files
    go to `skipped` here), ("shards", [(tar, start, stop), ...]) for webdataset shards. Fixed cuts of
    the input, not of the output: which files decode is only known once they are decoded."""
    from pas.data.chunks import shard_spans
    from pas.io.shards import list_shards

    src = Path(p.source)
    if not src.exists():
        raise PoolError(f"pool.source={p.source!r} does not exist "
                        "(offline default: `apt-get install openclipart-png`)")
    if p.format == "shards":
        if not (src.suffix == ".tar" and src.is_file()) and not (src.is_dir() and any(src.glob("*.tar"))):
            raise PoolError(f"pool.source={p.source!r}: no .tar shards there (pool.format: shards)")
        return shard_spans(list_shards(src), CHUNK)
    if not src.is_dir():
        raise PoolError(f"pool.source={p.source!r} is not a folder (pool.format: folder; "
                        "a .tar needs pool.format: shards)")
    files = [f.relative_to(src).as_posix() for f in list_image_files(src, p, skipped)]
    log.info("pool: %d image files under %s", len(files), src)
    return [("files", str(src), files[i:i + CHUNK]) for i in range(0, len(files), CHUNK)]


def decode_chunk(item: tuple, p: PoolParams) -> tuple[list[dict], list[bytes]]:
    """Worker (a spawned process, or inline): every entry of one `plan_chunks` item, decoded and
    re-encoded as the JPEG the pool stores. Returns (records, jpegs): a record is either a stored
    image's index row ({path, key, category, width, height, stored_width, stored_height, rotated,
    caption}; its JPEG is the next one of `jpegs`) or a skipped file's row ({path, reason, detail})."""
    records, jpegs = [], []
    if item[0] == "files":
        entries = (_decode_file(item[1], rel, p) for rel in item[2])
    else:
        from pas.io.shards import read_samples

        entries = (_decode_sample(s, p) for shard, start, stop in item[1]
                   for s in read_samples(shard, start, stop))
    for entry in entries:
        if entry is None:               # a shard sample outside include/exclude
            continue
        rec, jpeg = entry
        records.append(rec)
        if jpeg is not None:
            jpegs.append(jpeg)
    return records, jpegs


def _decode_file(root: str, rel: str, p: PoolParams) -> tuple[dict, bytes | None]:
    from pas.data.images import BadImage, load_rgb, open_image
    from pas.io.shards import make_key

    path = os.path.join(root, rel)
    try:
        with open_image(path, p.max_pixels, rel) as head:
            w, h = head.size
    except Exception:  # noqa: BLE001 - load_rgb below reports it with a reason
        w = h = 0
    try:
        img = load_rgb(path, max_pixels=p.max_pixels, max_side=p.max_side, min_side=p.min_side)
    except BadImage as e:
        return {"path": rel, "reason": e.reason, "detail": e.detail}, None
    orientation = img.info.get("exif_orientation", 1)
    return _stored(make_key("p", rel), rel, category_of(Path(rel)), w, h, img, orientation, "", p)


def _stored(key, path, category, w, h, img, orientation, caption, p) -> tuple[dict, bytes]:
    from pas.io.shards import encode_image

    if orientation >= 5:  # EXIF 5-8 turn by 90°: the header's size (w, h) is the sideways one
        w, h = h, w
    return ({"path": path, "key": key, "category": category, "width": w, "height": h,
             "stored_width": img.width, "stored_height": img.height, "rotated": orientation != 1,
             "caption": caption}, encode_image(img, "jpg", p.jpeg_quality))


def _decode_sample(s, p: PoolParams) -> tuple[dict, bytes | None] | None:
    """One sample of an existing webdataset shard (e.g. a LAION subset written by img2dataset)."""
    import io

    from pas.data.images import BadImage, error_text, open_image, to_rgb_on_white, upright
    from pas.io.shards import KEY_RE, make_key

    ref = f"{s.shard}/{s.key}"
    cat = str(s.meta.get("category", ""))
    try:
        try:  # tar member names decode with surrogateescape; the JSON may hold lone surrogates
            ref.encode("utf-8"), cat.encode("utf-8")
        except UnicodeEncodeError:
            raise BadImage("bad_filename", shown(ref)) from None
        im = open_image(io.BytesIO(s.image), p.max_pixels, ref)
        w, h = im.size
        if min(w, h) < p.min_side:
            raise BadImage("too_small", f"{ref}: {w}x{h}")
        try:
            im.load()
            im, orientation = upright(im)
            img = to_rgb_on_white(im)
        except Exception as e:  # noqa: BLE001
            raise BadImage("corrupt", f"{ref}: {error_text(e)}") from None
    except BadImage as e:
        return {"path": shown(ref), "reason": e.reason, "detail": e.detail}, None
    if max(img.size) > p.max_side:
        img.thumbnail((p.max_side, p.max_side))
    if not _keep_category(cat, p.include, p.exclude):
        return None
    key = s.key if KEY_RE.match(s.key) and s.key.startswith("p") else make_key("p", ref)
    return _stored(key, ref, cat, w, h, img, orientation, str(s.meta.get("caption") or ""), p)


def workers_from_env(env: dict | None = None) -> int:
    """PAS_POOL_WORKERS: decode processes (0 or unset = every core), like PAS_ENGINE machine
    configuration read from the environment, so changing it reruns nothing."""
    raw = (os.environ if env is None else env).get("PAS_POOL_WORKERS", "").strip() or "0"
    if not raw.isdigit():
        raise ParamsError(f"PAS_POOL_WORKERS={raw!r}: expected a whole number ≥ 0 (0 = every core)")
    return int(raw)


def n_workers(p: PoolParams) -> int:
    """Decode processes: `p.workers`, or 0 = the cores this process may run on."""
    if p.workers:
        return p.workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decoded_chunks(items: list[tuple], p: PoolParams, todo: set[int]) -> Iterator[tuple[int, tuple | None]]:
    """(i, decode_chunk(items[i])) for every item in order, None for the items not in `todo`. With
    `p.workers` > 1 the chunks are decoded ahead in spawned processes (a few per worker in flight);
    results come back in item order, so nothing downstream depends on the worker count."""
    from collections import deque

    workers = min(n_workers(p), len(todo))
    if workers <= 1:
        for i in range(len(items)):
            yield i, decode_chunk(items[i], p) if i in todo else None
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the caller may hold torch's threads, which a forked child can deadlock on
    ex = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    ahead, queue = deque(sorted(todo)), deque()     # chunks to submit, futures in chunk order
    try:
        for i in range(len(items)):
            while ahead and len(queue) < 2 * workers:
                queue.append(ex.submit(decode_chunk, items[ahead.popleft()], p))
            yield i, queue.popleft().result() if i in todo else None
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def iter_pool(p: PoolParams, skipped: list[dict]) -> Iterator[_Item]:
    """The pool's images in stored order, decoded as the pool stage stores them; bad files are
    appended to `skipped` ({path, reason, detail}). Also read by the offline model training."""
    items = plan_chunks(p, skipped)     # checks the source now, not at the first next()
    return _iter_items(items, p, skipped)


def _iter_items(items: list[tuple], p: PoolParams, skipped: list[dict]) -> Iterator[_Item]:
    from pas.io.shards import decode_image

    n = 0
    for _, (records, jpegs) in decoded_chunks(items, p, set(range(len(items)))):
        jpeg_of = iter(jpegs)
        for r in records:
            if "reason" in r:
                skipped.append(r)
                continue
            jpeg = next(jpeg_of)
            yield _Item(r["key"], r["path"], r["category"], r["width"], r["height"], decode_image(jpeg), jpeg,
                        r["caption"], r["rotated"])
            n += 1
            if p.format == "shards" and p.max_images and n >= p.max_images:
                return


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
    from pas.io.shards import clean_out, write_index
    from pas.jsonio import write_json

    out = Path(out_dir)
    clean_out(out, "pool", ("embeddings.npy", "faiss.index", "skipped.parquet", "index.parquet"))
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
    index.add(emb)
    return index


class ChunkEmbeddings:
    """`pas.engine.map_shards` work: CLIP embeddings of one chunk's stored images, read back from the
    written pool shards (item ("shards", [(tar, start, stop), ...])), in batches of `batch_size`
    counted from the chunk's first image: the plan `build_pool` uses locally, so both engines give the
    same bytes. Pickles without the model; a Ray actor loads CLIP once."""

    def __init__(self, clip_dir: str | Path, device: str, batch_size: int, clip=None):
        self.clip_dir, self.device, self.batch_size, self.clip = str(clip_dir), device, batch_size, clip

    def __getstate__(self) -> dict:
        return {**self.__dict__, "clip": None}

    def __call__(self):
        if self.clip is None:
            from pas.models.clip import load_clip

            self.clip = load_clip(self.clip_dir, device=self.device)
        return self.run

    def run(self, item: tuple) -> np.ndarray:
        from pas.data.chunks import load_chunk

        return self.clip.encode_images([im for _, im in load_chunk(item)], batch_size=self.batch_size)


def embed_jpegs(clip, jpegs: list[bytes], batch_size: int) -> np.ndarray:
    """CLIP embeddings of stored JPEGs (decoded as readers decode them), batches from the first."""
    from pas.io.shards import decode_image

    return clip.encode_images([decode_image(j) for j in jpegs], batch_size=batch_size)


CACHE_ARRAYS = ("records", "jpeg", "jpeg_sizes", "x")


def pack_chunk(records: list[dict], jpegs: list[bytes], x: np.ndarray) -> dict[str, np.ndarray]:
    """One chunk's result as the arrays of its resume file."""
    blob = json.dumps(records, sort_keys=True, ensure_ascii=True).encode()
    return {"records": np.frombuffer(blob, np.uint8), "jpeg": np.frombuffer(b"".join(jpegs), np.uint8),
            "jpeg_sizes": np.array([len(j) for j in jpegs], np.int64), "x": np.asarray(x, np.float32)}


def unpack_chunk(z: dict[str, np.ndarray]) -> tuple[list[dict], list[bytes], np.ndarray] | None:
    """`pack_chunk`'s arrays back, or None when they do not fit together (a foreign file)."""
    try:
        records = json.loads(z["records"].tobytes())
    except ValueError:
        return None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        return None
    data, ends = z["jpeg"].tobytes(), np.cumsum(z["jpeg_sizes"])
    n_ok = sum("key" in r for r in records)
    if len(ends) != n_ok or len(z["x"]) != n_ok or (int(ends[-1]) if n_ok else 0) != len(data):
        return None
    jpegs = [data[int(e - n):int(e)] for e, n in zip(ends, z["jpeg_sizes"])]
    return records, jpegs, z["x"]


def cache_fingerprint(p: PoolParams, clip_fingerprint: str) -> str:
    """What a chunk's result depends on besides its input bytes: CLIP, the decode/encode settings and
    libraries, batching and device (kernels round differently), the chunk size. Not the shard size or
    faiss settings: the same chunks serve another `shard_size` or `index`."""
    from importlib.metadata import version

    return json.dumps({"clip": clip_fingerprint, "source": str(p.source), "format": p.format,
                       "include": p.include, "exclude": p.exclude, "max_pixels": p.max_pixels,
                       "max_side": p.max_side, "min_side": p.min_side, "jpeg_quality": p.jpeg_quality,
                       "batch_size": p.batch_size, "device": p.device, "chunk": CHUNK,
                       "pillow": version("pillow"), "torch": version("torch")}, sort_keys=True)


def build_pool(p: PoolParams, clip, out_dir: str | Path, clip_dir: str | Path | None = None,
               engine=None, cache_dir: str | Path | None = None) -> dict:
    """Index `p.source` into `out_dir`; returns the stage metrics. `clip` is a loaded
    `pas.models.clip.Clip` (or None with `clip_dir`, the folder it comes from).

    The input is cut into chunks of CHUNK files (`plan_chunks`). Chunks are decoded in `p.workers`
    processes, in order; embedding runs on `engine` (`pas.engine.EngineConfig`, default PAS_ENGINE):
    `local` embeds each chunk here as it is written, `ray` embeds the written chunks on an actor pool
    afterwards. Batches restart at every chunk, so the bytes are the same either way.

    With `cache_dir` each finished chunk (records, JPEGs, embeddings) is kept there
    (`pas.io.resume.WorkStore`, keyed by the chunk's file bytes and `cache_fingerprint`): a rerun
    after a kill decodes and embeds only the chunks that were not finished, with the same bytes out."""
    from contextlib import closing

    import faiss
    from tqdm import tqdm

    from pas.engine import EngineConfig, map_shards
    from pas.io.manifest import write_parquet
    from pas.io.resume import Arrays, WorkStore, chunk_identity
    from pas.io.shards import ShardWriter, read_samples
    from pas.io.shards import write_index as write_shard_index
    from pas.jsonio import write_json
    from pas.models.files import fingerprint_dir

    engine = EngineConfig.from_env() if engine is None else engine
    if clip is None and clip_dir is None:
        raise ValueError("build_pool needs a loaded clip or clip_dir")
    on_ray = engine.engine != "local"
    if clip is None and not on_ray:
        from pas.models.clip import load_clip

        clip = load_clip(clip_dir, device=p.device)
    t0 = time.time()
    skipped: list[dict] = []
    items = plan_chunks(p, skipped)     # checks the source before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # an index left by an earlier run would fail the check of the shards embedded before it is rewritten
    (out / "index.parquet").unlink(missing_ok=True)
    fp = clip.fingerprint if clip is not None else fingerprint_dir(clip_dir)
    cache = WorkStore(cache_dir, cache_fingerprint(p, fp), Arrays(CACHE_ARRAYS)) if cache_dir else None
    ids = [chunk_identity(it) for it in items] if cache is not None else []
    todo = {i for i in range(len(items)) if cache is None or not cache.has(ids[i])}

    rows: list[dict] = []
    embs: list[np.ndarray | None] = [None] * len(items)
    ray_todo: list[tuple[int, tuple, list[dict] | None]] = []   # (chunk, its written spans, records to cache)
    seen: set[str] = set()
    n_rotated = n_resumed = n_computed = 0
    t_wait = t_embed = 0.0
    done = False
    last_shard, pos = None, 0           # the shard being written, the next sample's place in it
    n_files = sum(len(it[2]) for it in items if it[0] == "files")
    with ShardWriter(out, prefix="pool", maxcount=p.shard_size) as w, \
            closing(decoded_chunks(items, p, todo)) as chunks, \
            tqdm(total=n_files or None, desc="pool", unit="img", mininterval=2) as bar:
        while not done:
            t = time.time()
            i, decoded = next(chunks, (None, None))
            t_wait += time.time() - t
            if i is None:
                break
            got = None
            if decoded is None:         # finished by an earlier run
                z = cache.get(ids[i])
                got = unpack_chunk(z) if z is not None else None
                if got is None:         # torn or foreign: redone here
                    if z is not None:
                        log.warning("pool: ignoring inconsistent resume file for chunk %d; recomputing", i)
                    decoded = decode_chunk(items[i], p)
                else:
                    n_resumed += 1
            n_computed += got is None
            records, jpegs, x = got if got is not None else (*decoded, None)
            # write the chunk: skipped rows, then the stored images in input order
            spans: list[list] = []
            written: list[bytes] = []
            jpeg_of = iter(jpegs)
            n_ok = sum("reason" not in r for r in records)
            for r in records:
                if "reason" in r:
                    skipped.append({k: r[k] for k in ("path", "reason", "detail")})
                    continue
                jpeg = next(jpeg_of)
                if r["key"] in seen:    # the same sample twice in shard input
                    skipped.append({"path": r["path"], "reason": "duplicate_key", "detail": r["key"]})
                    continue
                seen.add(r["key"])
                n_rotated += r["rotated"]
                shard = w.write(r["key"], jpeg, {"source": "pool", "path": r["path"], "category": r["category"]})
                if shard != last_shard:
                    last_shard, pos = shard, 0
                if spans and spans[-1][0] == shard:
                    spans[-1][2] = pos + 1
                else:
                    spans.append([shard, pos, pos + 1])
                pos += 1
                rows.append({c: r[c] for c in POOL_INDEX_COLUMNS if c != "shard"} | {"shard": shard})
                written.append(jpeg)
                if p.format == "shards" and p.max_images and len(rows) >= p.max_images:
                    done = True
                    break
            bar.update(len(records))
            # a cached result fits only a chunk written whole (no duplicate dropped, no max_images cut)
            whole = len(written) == n_ok
            if x is not None and whole:
                embs[i] = x
            elif on_ray:
                if written:
                    ray_todo.append((i, ("shards", [(str(out / s), a, b) for s, a, b in spans]),
                                     records if whole else None))
            else:
                t = time.time()
                embs[i] = embed_jpegs(clip, written, p.batch_size)
                t_embed += time.time() - t
                if cache is not None and whole and got is None:
                    cache.put(ids[i], pack_chunk(records, written, embs[i]))
    if not rows:
        raise _no_images(p, skipped)

    if ray_todo:
        def cache_chunk(j: int, x: np.ndarray) -> None:
            i, item, records = ray_todo[j]
            embs[i] = x
            if cache is not None and records is not None:
                jpegs = [s.image for shard, a, b in item[1] for s in read_samples(shard, a, b)]
                cache.put(ids[i], pack_chunk(records, jpegs, x))

        t = time.time()
        map_shards(ChunkEmbeddings(clip_dir, p.device, p.batch_size), [it for _, it, _ in ray_todo],
                   config=engine, on_result=cache_chunk, desc="pool embeddings")
        t_embed += time.time() - t
    emb = np.concatenate([e for e in embs if e is not None and len(e)])   # rows is not empty
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
    if cache is not None:
        cache.prune()                   # chunks of earlier inputs or settings
    secs = time.time() - t0
    reasons = Counter(s["reason"] for s in skipped)
    metrics = {"n_files": len(rows) + len(skipped), "n_indexed": len(rows), "n_skipped": len(skipped),
               **{f"skipped_{r}": n for r, n in sorted(reasons.items())}, "n_exif_rotated": n_rotated,
               "n_shards": len({r["shard"] for r in rows}), "dim": dim,
               "categories": len({r["category"] for r in rows}),
               "n_chunks_resumed": n_resumed, "n_chunks_computed": n_computed,
               "seconds": round(secs, 1), "images_per_second": round(len(rows) / max(secs, 1e-9), 1),
               # the main process waiting for decoded chunks vs embedding them: which one bounds the stage
               "seconds_decode_wait": round(t_wait, 1), "seconds_embed": round(t_embed, 1)}
    log.info("pool: indexed %d images, skipped %d %s in %.1fs (%d of %d chunks resumed; waited %.1fs for "
             "decoding, embedded %.1fs on %s)", len(rows), len(skipped), dict(reasons), secs, n_resumed,
             len(items), t_wait, t_embed, engine.engine)
    return metrics

