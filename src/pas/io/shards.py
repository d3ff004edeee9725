"""Image sets as webdataset tar shards (≤ `maxcount` samples each) + a parquet index.

Never one file per image: DVC moves many loose files ~60× slower than the same bytes in a few tars.
Shards are byte-reproducible: members are written in call order with mtime 0, fixed owner and mode.
A sample is `<key>.jpg` (or .png) + `<key>.json`; keys are `[A-Za-z0-9_-]` only, because webdataset
splits a member name at its first dot and because a key must never escape the output directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from PIL import Image

KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
SHARD_GLOB = "*.tar"


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
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


@dataclass(frozen=True)
class Sample:
    key: str
    image: bytes          # encoded image bytes
    ext: str              # "jpg" or "png"
    meta: dict            # the sample's JSON metadata
    shard: str            # shard file name it came from

    def pil(self) -> Image.Image:
        return decode_image(self.image)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = 0
    ti.mode = 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "pas"
    tar.addfile(ti, io.BytesIO(data))


class ShardWriter:
    """Write samples into `<out_dir>/<prefix>-000000.tar`, `-000001.tar`, ... (≤ maxcount each).

    `rows` collects (key, shard) for the parquet index. Use as a context manager.
    """

    def __init__(self, out_dir: str | Path, prefix: str = "shard", maxcount: int = 10_000):
        if maxcount < 1:
            raise ValueError("maxcount must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.maxcount = prefix, maxcount
        self.shards: list[str] = []
        self.rows: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._seen: set[str] = set()

    def _open_next(self) -> None:
        self.close()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self.shards.append(name)
        # format=USTAR keeps headers free of pax timestamps
        self._tar = tarfile.open(self.out_dir / name, "w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def write(self, key: str, image: bytes, meta: dict, ext: str = "jpg") -> str:
        check_key(key)
        if key in self._seen:
            raise ValueError(f"duplicate sample key {key!r}")
        self._seen.add(key)
        if self._tar is None or self._count >= self.maxcount:
            self._open_next()
        meta = {**meta, "key": key}
        _add(self._tar, f"{key}.{ext}", image)
        _add(self._tar, f"{key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode())
        self._count += 1
        self.rows.append({"key": key, "shard": self.shards[-1]})
        return self.shards[-1]

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def list_shards(path: str | Path) -> list[Path]:
    """Shard files of a directory (sorted), or the path itself if it is a .tar."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(path.glob(SHARD_GLOB))


def iter_samples(paths: str | Path | Iterable[str | Path]) -> Iterator[Sample]:
    """Yield samples of the given shard files or directories, in stored order."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for p in paths:
        for shard in list_shards(p):
            with tarfile.open(shard, "r") as tar:
                pending: dict[str, dict] = {}
                for member in tar:
                    if not member.isfile():
                        continue
                    base = member.name.rsplit("/", 1)[-1]
                    key, _, ext = base.partition(".")
                    data = tar.extractfile(member).read()
                    entry = pending.setdefault(key, {})
                    entry[ext] = data
                    if "json" in entry and any(e in entry for e in ("jpg", "jpeg", "png")):
                        img_ext = next(e for e in ("jpg", "jpeg", "png") if e in entry)
                        yield Sample(key=key, image=entry[img_ext], ext=img_ext,
                                     meta=json.loads(entry["json"]), shard=shard.name)
                        del pending[key]
