"""Benchmark: webdataset's ShardWriter / TarWriter and tar reader vs pas.io.shards (issue 15: where a
kept library does the same job, use it, if the shard bytes that dvc.lock pins stay the same).

The same --n samples (random RGB images encoded by `encode_image`, JSON by `meta_json`) are written
into shards of --maxcount by `pas.io.shards.ShardWriter` and by `webdataset.ShardWriter`, once with
webdataset's defaults and once with the arguments closest to ours. Every shard pair is compared
byte for byte and, where it differs, header field by header field (member order, mtime, uid/gid,
uname/gname, mode, pax records, archive length). Then both shard sets are read back with
`iter_samples` and with webdataset's `tarfile_samples` (keys, image and JSON bytes must agree).
Times are best of --repeats, the two sides alternately in one process.

    PYTHONPATH=src python benchmarks/webdataset_writer.py --out benchmarks/RESULTS-webdataset.md
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _common import emit
from pas.io.shards import ShardWriter, encode_image, iter_samples, meta_json

FIELDS = ("name", "size", "mtime", "mode", "uid", "gid", "uname", "gname", "type", "pax_headers", "offset")


def make_samples(n: int, side: int, ext: str, seed: int = 0) -> list[tuple[str, bytes, bytes]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        px = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        key = f"b{i:07d}"
        out.append((key, encode_image(Image.fromarray(px), ext),
                    meta_json(key, {"source": "real", "caption": f"a photo nº {i}", "i": i})))
    return out


def write_pas(d: Path, samples, ext: str, maxcount: int) -> list[Path]:
    with ShardWriter(d, prefix="shard", maxcount=maxcount) as w:
        for key, img, meta in samples:
            w.write_encoded(key, img, meta, ext)
    return [d / s for s in w.shards]


def write_wds(d: Path, samples, ext: str, maxcount: int, **kw) -> list[Path]:
    import webdataset as wds

    d.mkdir(parents=True, exist_ok=True)
    # maxsize: cut by count only, as ours; verbose 0: it prints a line per shard otherwise
    with wds.ShardWriter(str(d / "shard-%06d.tar"), maxcount=maxcount, maxsize=float("inf"), verbose=0,
                         encoder=False, **kw) as w:
        for key, img, meta in samples:
            w.write({"__key__": key, ext: img, "json": meta})
    return sorted(d.glob("*.tar"))


def headers(data: bytes) -> list[dict]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [{f: getattr(m, f) for f in FIELDS} for m in tar]


def diff(a: bytes, b: bytes) -> dict:
    """What differs between two tars: header fields (with the first differing pair of values), the
    member order, the length (end-of-archive padding)."""
    if a == b:
        return {}
    ha, hb = headers(a), headers(b)
    out: dict = {}
    if [h["name"] for h in ha] != [h["name"] for h in hb]:
        first = next(i for i, (x, y) in enumerate(zip(ha, hb)) if x["name"] != y["name"])
        out["member order"] = f"#{first}: {ha[first]['name']} vs {hb[first]['name']}"
    by_name = {h["name"]: h for h in hb}
    for h in ha:
        o = by_name.get(h["name"])
        for f in FIELDS[1:]:
            if o is not None and h[f] != o[f] and f not in out and not (f == "offset" and "member order" in out):
                out[f] = f"{h[f]!r} vs {o[f]!r}"
    if len(a) != len(b):
        out["length"] = f"{len(a)} vs {len(b)}"
    if not out:
        out["bytes"] = "headers parse equal, raw bytes differ"
    return out


def compare(pa: list[Path], pb: list[Path]) -> tuple[bool, dict]:
    if [p.name for p in pa] != [p.name for p in pb]:
        return False, {"shard names": f"{[p.name for p in pa]} vs {[p.name for p in pb]}"}
    diffs: dict = {}
    for x, y in zip(pa, pb):
        for k, v in diff(x.read_bytes(), y.read_bytes()).items():
            diffs.setdefault(k, v)
    return not diffs, diffs


def read_pas(d: Path) -> list[tuple[str, bytes, bytes]]:
    return [(s.key, s.image, meta_json(s.key, {k: v for k, v in s.meta.items() if k != "key"}))
            for s in iter_samples(d)]


def read_wds(d: Path, ext: str) -> list[tuple[str, bytes, bytes]]:
    from webdataset.tariterators import tarfile_samples

    urls = [{"url": str(p)} for p in sorted(d.glob("*.tar"))]
    return [(s["__key__"], s[ext], s["json"]) for s in tarfile_samples(urls)]


def best(fn, repeats: int) -> tuple[float, object]:
    t, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        t = min(t, time.perf_counter() - t0)
    return t, out


def import_seconds(module: str) -> float:
    """`import module` in a fresh interpreter (what a stage pays on its first use)."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def long_key(tmp: Path, n: int) -> str:
    """What each writer does with a key of n characters (our KEY_RE allows up to 128)."""
    out = []
    for name, write in (("pas", lambda d: write_pas(d, [("k" * n, b"x", b"{}")], "jpg", 10)),
                        ("wds", lambda d: write_wds(d, [("k" * n, b"x", b"{}")], "jpg", 10, user="pas",
                                                    group="pas", mtime=0))):
        try:
            paths = write(tmp / f"long{n}-{name}")
            pax = sorted({r for h in headers(paths[0].read_bytes()) for r in h["pax_headers"]})
            out.append(f"{name}: ok" + (f" (pax records {pax})" if pax else ""))
        except ValueError as e:
            out.append(f"{name}: {type(e).__name__}: {e}")
    return "; ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--side", type=int, default=128, help="image side in pixels")
    ap.add_argument("--maxcount", type=int, default=64, help="samples per shard")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="append the results to this markdown file")
    args = ap.parse_args()
    import webdataset as wds

    matched = {"user": "pas", "group": "pas", "mtime": 0}
    configs = {"defaults": {}, "user=group='pas', mtime=0": matched,
               "user=group='pas', mtime=0.0 (a float)": {**matched, "mtime": 0.0}}
    lines = [f"{platform.machine()}, {os.cpu_count()} cores (shared, load {os.getloadavg()[0]:.1f}), "
             f"Python {platform.python_version()}, webdataset {wds.__version__}; {args.n} samples of "
             f"{args.side}x{args.side} random RGB, {args.maxcount} per shard, best of {args.repeats}", ""]
    lines += ["| images | webdataset args | identical bytes | fields that differ (pas vs webdataset) |",
              "|---|---|---|---|"]
    timing = ["| images | MiB | pas write (ms) | wds write (ms) | wds / pas | pas read (ms) | wds read (ms) | "
              "wds / pas | same samples read |", "|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for ext in ("jpg", "png"):
            samples = make_samples(args.n, args.side, ext)
            ref = write_pas(tmp / f"pas-{ext}", samples, ext, args.maxcount)
            for i, (label, kw) in enumerate(configs.items()):
                same, d = compare(ref, write_wds(tmp / f"wds-{ext}-{i}", samples, ext, args.maxcount, **kw))
                lines.append(f"| {ext} | {label} | {same} | " + ("; ".join(f"{k}: {v}" for k, v in d.items())
                                                                 or "none") + " |")
            tw = {"pas": float("inf"), "wds": float("inf")}
            tr = dict(tw)
            for r in range(args.repeats):          # alternate the sides, one fresh directory per run
                for side in ("pas", "wds") if r % 2 == 0 else ("wds", "pas"):
                    d = tmp / f"t-{ext}-{side}-{r}"
                    t0 = time.perf_counter()
                    if side == "pas":
                        write_pas(d, samples, ext, args.maxcount)
                    else:
                        write_wds(d, samples, ext, args.maxcount, **matched)
                    tw[side] = min(tw[side], time.perf_counter() - t0)
            mib = sum(p.stat().st_size for p in ref) / 2**20
            wds_dir = tmp / f"wds-{ext}-1"
            got = {}
            for r in range(args.repeats):
                for side in ("pas", "wds") if r % 2 == 0 else ("wds", "pas"):
                    t0 = time.perf_counter()
                    got[side] = read_pas(tmp / f"pas-{ext}") if side == "pas" else read_wds(wds_dir, ext)
                    tr[side] = min(tr[side], time.perf_counter() - t0)
            timing.append(f"| {ext} | {mib:.1f} | {1e3 * tw['pas']:.1f} | {1e3 * tw['wds']:.1f} | "
                          f"{tw['wds'] / tw['pas']:.2f}x | {1e3 * tr['pas']:.1f} | {1e3 * tr['wds']:.1f} | "
                          f"{tr['wds'] / tr['pas']:.2f}x | {got['pas'] == got['wds'] == [s for s in samples]} |")
        lines += ["", *timing, ""]
        lines += [f"- key of {n} characters: {long_key(tmp, n)}" for n in (95, 96, 128)]
        empty = (write_pas(tmp / "empty-pas", [], "jpg", 10), write_wds(tmp / "empty-wds", [], "jpg", 10))
        lines.append("- no samples: pas writes " + ", ".join(f"{[p.name for p in e]}" for e in empty[:1])
                     + f", webdataset writes {[(p.name, p.stat().st_size) for p in empty[1]]} (name, bytes)")
    lines += [f"- import time in a fresh interpreter: pas.io.shards {import_seconds('pas.io.shards'):.2f} s, "
              f"webdataset {import_seconds('webdataset'):.2f} s (`import webdataset` imports torch: "
              f"{'torch' in sys.modules})"]
    text = "\n" + "\n".join(lines) + "\n"
    emit(text, args.out, append=True)


if __name__ == "__main__":
    main()
