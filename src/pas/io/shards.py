"""Image sets as webdataset tar shards (≤ `maxcount` samples each) + a parquet index.

Never one file per image: DVC hashes, caches and transfers each file on its own, so many loose files
move far slower than the same bytes in a few tars.
Shards are byte-reproducible: members are written in call order with mtime 0, fixed owner and mode.
A sample is `<key>.jpg` (or .png) + `<key>.json`; keys are `[A-Za-z0-9_-]` only, because webdataset
splits a member name at its first dot and because a key must never escape the output directory.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import os
import re
import tarfile
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from pas.hashing import sha256_file

# ≤ 95 characters: a member name (key + "." + an extension of ≤ 4) must fit USTAR's 100-byte name field
KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,95}$")
SHARD_GLOB = "*.tar"
INDEX_NAME = "index.parquet"
INDEX_BATCH = 65_536    # index rows read at a time when counting samples per shard
IMAGE_EXTS = ("jpg", "jpeg", "png")     # in order of preference when a sample has several


def make_key(prefix: str, *parts: object, n: int = 16) -> str:
    """A safe, stable key: `prefix` + hex digest of `parts` (any strings, even hostile ones)."""
    h = hashlib.sha1("\x1f".join(str(p) for p in parts).encode("utf-8", "surrogatepass")).hexdigest()
    key = f"{prefix}{h[:n]}"
    check_key(key)
    return key


def check_key(key: str) -> None:
    if not KEY_RE.match(key):
        raise ValueError(f"unsafe sample key {key!r}: keys must match {KEY_RE.pattern}")


def encode_image(img: Image.Image, fmt: str = "jpg", quality: int = 95) -> bytes:
    """Encode an RGB image deterministically (no timestamps or random metadata)."""
    buf = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        img.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=False)
    elif fmt == "png":
        img.save(buf, format="PNG", optimize=False)
    else:
        raise ValueError(f"unsupported image format {fmt!r}")
    return buf.getvalue()


def decode_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")     # convert loads the pixels first


@dataclass(frozen=True)
class Sample:
    key: str
    image: bytes          # encoded image bytes
    ext: str              # "jpg" or "png"
    meta: dict            # the sample's JSON metadata
    shard: str            # shard file name it came from

    def pil(self) -> Image.Image:
        return decode_image(self.image)


def meta_json(key: str, meta: dict) -> bytes:
    """A sample's JSON member as the writers store it: `meta` with its `key`, keys sorted, UTF-8."""
    return json.dumps({**meta, "key": key}, sort_keys=True, ensure_ascii=False).encode()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = 0
    ti.mode = 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "pas"
    tar.addfile(ti, io.BytesIO(data))


class _KeyColumn:
    """Keys in write order as one ASCII buffer + end offsets, with a duplicate check: an
    open-addressing table (linear probing) of row numbers, found by each key's hash and confirmed on
    the stored bytes, so a hash collision is only ever a slower lookup, never a false duplicate.
    A key's bytes + 32..48 B (offset, hash, 2..4 table slots) and no Python object per key (a list
    of str and a set of them: benchmarks/RESULTS-scale.md)."""

    hash = staticmethod(hash)       # str hashes: any function works, equal hashes are compared exactly

    def __init__(self) -> None:
        self.buf = bytearray()
        self.ends = array("q")      # row r's key is buf[ends[r - 1]:ends[r]]
        self.hashes = array("q")
        self._size = 64             # home slots (a power of 2); the table runs on past them, no wrap
        self._table = array("q", bytes(8 * self._size))    # row + 1 per slot, 0 = empty

    def __len__(self) -> int:
        return len(self.ends)

    def _key(self, r: int) -> bytes:
        return bytes(self.buf[self.ends[r - 1] if r else 0:self.ends[r]])

    def find(self, key: str) -> tuple[int, int]:
        """(the free slot to `add` `key` at, its hash); ValueError if `key` is already here."""
        h = self.hash(key)
        t, i = self._table, h & (self._size - 1)
        while True:
            if i == len(t):
                t.frombytes(bytes(8 * 64))
            r = t[i] - 1
            if r < 0:
                return i, h
            if self.hashes[r] == h and self._key(r) == key.encode("ascii"):
                raise ValueError(f"duplicate sample key {key!r}")
            i += 1

    def add(self, key: str, slot: int, h: int) -> None:
        """Append `key` at the slot `find` gave (nothing may be added in between)."""
        self.buf += key.encode("ascii")
        self.ends.append(len(self.buf))
        self.hashes.append(h)
        self._table[slot] = len(self.ends)
        if 2 * len(self.ends) > self._size:
            self._rebuild(2 * self._size)

    def _rebuild(self, size: int) -> None:
        # every key placed at once, in home-slot order: each takes its home slot or the one after the
        # previous key's, whichever is later, so every slot from a key's home to its own is taken (as
        # linear probing needs); in place where it can, the transient arrays being ~4 int64 a key
        home = np.frombuffer(self.hashes, np.int64) & (size - 1)
        order = np.argsort(home, kind="stable")
        pos = home[order]
        del home
        step = np.arange(len(pos))
        pos -= step
        np.maximum.accumulate(pos, out=pos)
        pos += step
        del step
        table = array("q", [0]) * max(size, int(pos[-1]) + 1)
        view = np.frombuffer(table, np.int64)
        order += 1
        view[pos] = order
        del view                    # a buffer view would stop `find` from extending the table
        self._size, self._table = size, table

    def arrow(self):
        """The keys as a pyarrow large_string array (of a copy of the buffer: a view would stop
        `add` from growing it)."""
        import pyarrow as pa

        offsets = np.concatenate([np.zeros(1, np.int64), np.frombuffer(self.ends, np.int64)])
        return pa.LargeStringArray.from_buffers(len(self), pa.py_buffer(offsets), pa.py_buffer(bytes(self.buf)))

    def tolist(self) -> list[str]:
        text, ends = self.buf.decode("ascii"), self.ends.tolist()
        return [text[a:b] for a, b in zip([0, *ends[:-1]], ends)]


class ShardWriter:
    """Write samples into `<out_dir>/<prefix>-000000.tar`, `-000001.tar`, ... (≤ maxcount each).

    The (key, shard) of every written sample is kept as columns (the keys' bytes, each one's shard
    number), not a Python object per sample (benchmarks/RESULTS-scale.md): `index_frame()` is the
    parquet index's key/shard table, `keys` and `rows` the same as lists. Use as a context manager.
    """

    def __init__(self, out_dir: str | Path, prefix: str = "shard", maxcount: int = 10_000):
        if maxcount < 1:
            raise ValueError("maxcount must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.maxcount = prefix, maxcount
        self.shards: list[str] = []
        self._keys = _KeyColumn()
        self._shard_of = array("q")     # per written sample: its shard's number in `shards`
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def _open_next(self) -> None:
        self.close()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self.shards.append(name)
        # format=USTAR keeps headers free of pax timestamps
        self._tar = tarfile.open(self.out_dir / name, "w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def write(self, key: str, image: bytes, meta: dict, ext: str = "jpg") -> str:
        return self.write_encoded(key, image, meta_json(key, meta), ext)

    def write_encoded(self, key: str, image: bytes, meta: bytes, ext: str = "jpg") -> str:
        """`write` with the JSON member already encoded (by `meta_json`, so the bytes are the same)."""
        check_key(key)
        slot, h = self._keys.find(key)
        shard = self._add_sample(key, image, meta, ext)
        self._keys.add(key, slot, h)
        self._shard_of.append(len(self.shards) - 1)
        return shard

    @property
    def n_samples(self) -> int:
        """Samples written by `write` / `write_encoded`."""
        return len(self._keys)

    @property
    def keys(self) -> list[str]:
        """The written keys, in write order (a new list each call)."""
        return self._keys.tolist()

    @property
    def rows(self) -> list[dict]:
        """{"key", "shard"} per written sample, in write order."""
        return [{"key": k, "shard": self.shards[i]} for k, i in zip(self.keys, self._shard_of)]

    def index_frame(self):
        """The written samples' key and shard columns (the DataFrame `pd.DataFrame(self.rows)` is,
        without a dict per sample), for `write_index`."""
        import pandas as pd
        import pyarrow as pa

        if not self.n_samples:
            return pd.DataFrame([])         # as pd.DataFrame of no rows: no columns
        # the dtype pandas infers for str values (pandas 3: arrow-backed), made from arrow arrays:
        # no str object per sample
        dtype = pd.Series(["key"]).dtype
        shard = pa.array(self.shards, pa.large_string()).take(np.frombuffer(self._shard_of, np.int64))
        return pd.DataFrame({"key": pd.array(self._keys.arrow(), dtype=dtype), "shard": pd.array(shard, dtype=dtype)})

    def _add_sample(self, key: str, image: bytes, meta: dict | bytes, ext: str) -> str:
        if self._tar is None or self._count >= self.maxcount:
            self._open_next()
        _add(self._tar, f"{key}.{ext}", image)
        _add(self._tar, f"{key}.json", meta if isinstance(meta, bytes) else meta_json(key, meta))
        self._count += 1
        return self.shards[-1]

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class IndexedShardWriter(ShardWriter):
    """A `ShardWriter` that also writes the directory's index.parquet as it goes, for sets too large
    to hold a row per image in memory: the rows of each shard, with its `shard_sha256`, become one
    row group when the shard is closed. Keys must come in increasing order (checked; that is what
    keeps them unique without a set of every key), so the index is sorted by key like `write_index`'s.
    `schema`: pyarrow schema of the index columns (`key`, `shard`, then what `write(row=...)` gives).
    The index appears (renamed from a temp name) only when the `with` block ends without an error."""

    def __init__(self, out_dir: str | Path, schema, prefix: str = "shard", maxcount: int = 10_000):
        import pyarrow as pa
        import pyarrow.parquet as pq

        super().__init__(out_dir, prefix, maxcount)
        if schema.names[:2] != ["key", "shard"]:
            raise ValueError("index schema must start with key, shard")
        self.schema = schema.append(pa.field("shard_sha256", pa.string()))
        self._last: str | None = None
        self._pending: list[dict] = []
        self._tmp = self.out_dir / f".tmp-{INDEX_NAME}"
        self._pq = pq.ParquetWriter(self._tmp, self.schema)

    def write(self, key: str, image: bytes, meta: dict, ext: str = "jpg", row: dict | None = None) -> str:
        check_key(key)
        if self._last is not None and key <= self._last:
            raise ValueError(f"sample key {key!r} after {self._last!r}: keys must increase")
        self._last = key
        shard = self._add_sample(key, image, meta, ext)
        self._pending.append({**(row or {}), "key": key, "shard": shard})
        return shard

    def close(self) -> None:
        """Close the open shard and write its index rows."""
        import pyarrow as pa

        super().close()
        if self._pending:
            sha = shard_sha256(self.out_dir / self._pending[0]["shard"])
            rows = [{**r, "shard_sha256": sha} for r in self._pending]
            self._pq.write_table(pa.Table.from_pylist(rows, schema=self.schema))
            self._pending = []

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
            self._pq.close()
            os.replace(self._tmp, self.out_dir / INDEX_NAME)
        else:                               # no index for a half-written set
            super().close()
            self._pq.close()
            self._tmp.unlink(missing_ok=True)


class ShardError(ValueError):
    """A shard that cannot be read, or that disagrees with its directory's index.parquet."""


def _version(path: str | Path) -> tuple[str, int, int, int]:
    # what changes when a file is rewritten or replaced (dvc checkout links a new inode)
    st = os.stat(path)
    return str(path), st.st_size, st.st_mtime_ns, st.st_ino


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int, ino: int) -> str:
    return sha256_file(path)            # the version fields are the cache key only


def shard_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (hashed once per process and file version)."""
    return _sha256(*_version(path))


def write_index(index, out_dir: str | Path, sort_by: str | None = "key") -> Path:
    """Write `index` (a DataFrame with key, shard, ...) to `out_dir/index.parquet`, adding the
    `shard_sha256` of each row's shard: readers check every shard against it and the row count."""
    from pas.io.manifest import write_parquet

    import pandas as pd

    out_dir = Path(out_dir)
    codes, names = pd.factorize(index["shard"])
    if (codes < 0).any():
        raise ValueError("index rows without a shard")
    # one str per shard that its rows share (`map` + `astype(object)` made one per row), added with
    # `assign`: a deep copy would duplicate every column for one more
    sha = np.array([shard_sha256(out_dir / name) for name in names], dtype=object)
    index = index.assign(shard_sha256=pd.Series(sha[codes], index=index.index, dtype=object))
    return write_parquet(index, out_dir / INDEX_NAME, sort_by=sort_by)


def clean_out(out_dir: str | Path, prefix: str, names: Iterable[str]) -> None:
    """Make `out_dir` and remove what a previous run of its stage wrote: `<prefix>-*.tar` and `names`
    (plain files only, so nothing else that lives there is touched)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in [*out_dir.glob(f"{prefix}-*.tar"), *(out_dir / n for n in names)]:
        if p.is_file():
            p.unlink()


@functools.lru_cache(maxsize=16)
def _expected(path: str, size: int, mtime_ns: int, ino: int) -> dict[str, tuple[int, str | None]] | None:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        if "shard" not in names:            # not an index of shards
            return None
        cols = ["shard"] + (["shard_sha256"] if "shard_sha256" in names else [])
        # in row batches: the whole index as Python lists costs far more than the dict of one entry
        # per shard it is read for (benchmarks/RESULTS-scale.md)
        out: dict[str, tuple[int, str | None]] = {}
        for batch in pq.ParquetFile(path).iter_batches(batch_size=INDEX_BATCH, columns=cols):
            table = batch.to_pydict()
            for i, name in enumerate(table["shard"]):
                n, _ = out.get(name, (0, None))
                out[name] = (n + 1, table["shard_sha256"][i] if "shard_sha256" in table else None)
    except Exception as e:                  # pyarrow raises several types for a damaged file
        raise ShardError(f"{path}: unreadable index ({e})") from e
    return out


def expected_shards(d: str | Path) -> dict[str, tuple[int, str | None]] | None:
    """{shard name: (samples, sha256 or None)} from `d/index.parquet`, or None without an index."""
    index = Path(d) / INDEX_NAME
    return _expected(*_version(index)) if index.is_file() else None


def verify_shard(shard: str | Path) -> int | None:
    """Check `shard` against its directory's index: it must be listed and, when the index stores it,
    have the stored sha256 (so a shard cut at a member boundary or corrupted in place is refused).
    Returns the number of samples the index lists for it, or None when there is no index."""
    shard = Path(shard)
    want = expected_shards(shard.parent)
    if want is None:
        return None
    if shard.name not in want:
        raise ShardError(f"{shard}: shard not listed in {shard.parent / INDEX_NAME}")
    n, sha = want[shard.name]
    if sha is not None and shard_sha256(shard) != sha:
        raise ShardError(f"{shard}: sha256 differs from {shard.parent / INDEX_NAME} "
                         f"(truncated or corrupted; rerun the stage that wrote it)")
    return n


def _check_count(shard: Path, n: int, want: int | None) -> None:
    if want is not None and n != want:
        raise ShardError(f"{shard}: {n} samples but {shard.parent / INDEX_NAME} lists {want} "
                         f"(truncated or rewritten; rerun the stage that wrote it)")


def list_shards(path: str | Path) -> list[Path]:
    """Shard files of a directory (sorted), or the path itself if it is a .tar. A directory's
    index.parquet must not list a shard that is not there."""
    path = Path(path)
    if path.is_file():
        return [path]
    shards = sorted(path.glob(SHARD_GLOB))
    want = expected_shards(path) if path.is_dir() else None
    missing = sorted(set(want or ()) - {s.name for s in shards})
    if missing:
        raise ShardError(f"{path / missing[0]}: shard listed in {path / INDEX_NAME} is missing")
    return shards


def _samples_of(members: Iterable[tuple[str, object]]) -> Iterator[tuple[str, str, object, object]]:
    """(key, image ext, image value, json value) per sample from (member name, value) pairs of the
    regular files in stored order: a sample is complete when its json and an image member have both
    been seen (the last member of an ext wins). The value is the data, or where the data lies."""
    pending: dict[str, dict[str, object]] = {}
    for name, value in members:
        key, _, ext = name.rsplit("/", 1)[-1].partition(".")
        entry = pending.setdefault(key, {})
        entry[ext] = value
        if "json" in entry and any(e in entry for e in IMAGE_EXTS):
            img_ext = next(e for e in IMAGE_EXTS if e in entry)
            yield key, img_ext, entry[img_ext], entry["json"]
            del pending[key]


# what a damaged tar raises while being read (json errors are ValueErrors)
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, zlib.error)


def iter_samples(paths: str | Path | Iterable[str | Path]) -> Iterator[Sample]:
    """Yield samples of the given shard files or directories, in stored order. A shard in a directory
    with an index.parquet is checked against it (`verify_shard`, and its sample count at its end)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for p in paths:
        for shard in list_shards(p):
            want = verify_shard(shard)
            n = 0
            try:
                with tarfile.open(shard, "r") as tar:
                    # data is read in member order: a compressed tar cannot seek back cheaply
                    members = ((m.name, tar.extractfile(m).read()) for m in tar if m.isfile())
                    for key, ext, image, meta in _samples_of(members):
                        n += 1
                        yield Sample(key=key, image=image, ext=ext, meta=json.loads(meta), shard=shard.name)
            except ShardError:
                raise
            except _READ_ERRORS as e:
                raise ShardError(f"{shard}: unreadable shard ({type(e).__name__}: {e})") from e
            _check_count(shard, n, want)


@dataclass(frozen=True)
class SampleTable:
    """Where each sample of an uncompressed shard lies: keys, image exts and, per sample, the
    (image offset, image size, json offset, json size) of its members' data, in stored order."""
    keys: list[str]
    exts: list[str]
    spans: np.ndarray       # (n, 4) int64

    def __len__(self) -> int:
        return len(self.keys)


@functools.lru_cache(maxsize=16)
def _table(path: str, size: int, mtime_ns: int, ino: int) -> SampleTable | None:
    # the file's version is in the cache key so a rewritten shard is scanned again
    try:
        tar = tarfile.open(path, "r:")      # uncompressed only: offsets must be file offsets
    except tarfile.ReadError:
        return None                         # compressed (or damaged: the sequential reader says so)
    try:
        with tar:                           # iterating members reads headers and seeks over the data
            members = list(tar)
    except _READ_ERRORS as e:
        raise ShardError(f"{path}: unreadable shard ({type(e).__name__}: {e})") from e
    if any(m.issparse() for m in members):  # sparse data is not stored contiguously
        return None
    members = ((m.name, (m.offset_data, m.size)) for m in members if m.isfile())
    rows = [(k, e, (*i, *j)) for k, e, i, j in _samples_of(members)]
    return SampleTable([r[0] for r in rows], [r[1] for r in rows],
                       np.array([r[2] for r in rows], dtype=np.int64).reshape(-1, 4))


def sample_table(shard: str | Path) -> SampleTable | None:
    """The `SampleTable` of a shard (one header-only scan per process and shard version), or None
    for a compressed tar."""
    return _table(*_version(shard))


def count_samples(shard: str | Path) -> int:
    """Samples in one shard, from its headers only."""
    table = sample_table(shard)
    return len(table) if table is not None else sum(1 for _ in iter_samples(shard))


def _read_at(f, offset: int, size: int, shard: str | Path) -> bytes:
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise ShardError(f"{shard}: truncated shard (member at byte {offset} is cut short)")
    return data


def read_samples(shard: str | Path, start: int, stop: int) -> Iterator[Sample]:
    """Samples start..stop of one shard (as `iter_samples` numbers them), reading only their members,
    so reading a shard in pieces costs the same as reading it once. Checked like `iter_samples`."""
    shard = Path(shard)
    want = verify_shard(shard)
    table = sample_table(shard)
    if table is None:                       # compressed: no random access, read from the start
        yield from itertools.islice(iter_samples(shard), start, stop)
        return
    _check_count(shard, len(table), want)
    yield from _read_at_spans(shard, table, range(start, min(stop, len(table))))


def read_samples_by_key(shard: str | Path, keys: Iterable[str]) -> Iterator[Sample]:
    """The samples of one uncompressed shard named by `keys`, in that order, each read by seeking to
    its members (a shard written in another order is read sorted without holding its images).
    Checked like `iter_samples`; a key the shard lacks raises ShardError."""
    shard = Path(shard)
    want = verify_shard(shard)
    table = sample_table(shard)
    if table is None:
        raise ShardError(f"{shard}: compressed shard, cannot be read by key")
    _check_count(shard, len(table), want)
    where = {k: i for i, k in enumerate(table.keys)}
    try:
        order = [where[k] for k in keys]
    except KeyError as e:
        raise ShardError(f"{shard}: no sample {e.args[0]!r}") from None
    yield from _read_at_spans(shard, table, order)


def _read_at_spans(shard: Path, table: SampleTable, order: Iterable[int]) -> Iterator[Sample]:
    with open(shard, "rb") as f:
        for i in order:
            img_off, img_size, meta_off, meta_size = (int(v) for v in table.spans[i])
            image = _read_at(f, img_off, img_size, shard)
            blob = _read_at(f, meta_off, meta_size, shard)
            try:
                meta = json.loads(blob)
            except ValueError as e:
                raise ShardError(f"{shard}: unreadable json of sample {table.keys[i]!r} ({e})") from e
            yield Sample(key=table.keys[i], image=image, ext=table.exts[i], meta=meta, shard=shard.name)
