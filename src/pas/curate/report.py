"""A visual check of deduplication: the largest duplicate groups as thumbnails (paper Fig. 9/12).

One self-contained HTML page (thumbnails embedded as base64 JPEG), so it opens offline, from a DVC
cache or a CI artifact alike. Same manifest + same images → same bytes.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Mapping

import pandas as pd


def largest_groups(manifest: pd.DataFrame, n_groups: int = 20, per_group: int = 12) -> list[dict]:
    """The `n_groups` largest components with more than one image, largest first (ties: component id).

    Each group: component, size, keys (representative first, then by descending score, then key;
    at most `per_group`).
    """
    if not len(manifest) or n_groups == 0:
        return []
    dup = manifest[manifest["component_size"] > 1]
    out = []
    for comp, g in sorted(dup.groupby("component"), key=lambda t: (-int(t[1]["component_size"].iloc[0]), t[0])):
        if len(out) >= n_groups:
            break
        g = g.assign(_rep=~g["kept"]).sort_values(["_rep", "score", "key"], ascending=[True, False, True],
                                                  kind="stable")
        out.append({"component": int(comp), "size": int(g["component_size"].iloc[0]),
                    "representative": str(g["representative"].iloc[0]), "keys": list(g["key"])[:per_group]})
    return out


def thumbnail_b64(image, size: int = 128, quality: int = 80) -> str:
    """Base64 JPEG of encoded image bytes or a PIL image, longer side at most `size`."""
    from pas.io.shards import decode_image

    img = decode_image(image) if isinstance(image, (bytes, bytearray)) else image.convert("RGB")
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """
body{font-family:sans-serif;margin:1em;background:#fafafa}
.group{margin:0 0 1.2em 0;padding:.5em;background:#fff;border:1px solid #ddd}
.row{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;text-align:center;font-size:11px;width:136px;word-break:break-all}
img{border:3px solid #ccc;max-width:128px;max-height:128px}
figure.kept img{border-color:#2a2}
figure.removed img{border-color:#c33}
"""


def groups_html(groups: list[dict], images: Mapping[str, bytes], info: Mapping[str, dict] | None = None,
                title: str = "pas dedup: largest duplicate groups", summary: Mapping | None = None,
                thumb: int = 128) -> str:
    """HTML page of `groups` (from `largest_groups`); `images` maps key → encoded image bytes,
    `info` key → {"source", "score"} shown under each thumbnail."""
    info = info or {}
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    if summary:
        items = ", ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in summary.items())
        parts.append(f"<p>{items}</p>")
    parts.append("<p>Green border: the image kept for its group; red: removed as a duplicate. "
                 "Score: highest SSCD cosine to a kNN neighbour.</p>")
    if not groups:
        parts.append("<p>No duplicate groups.</p>")
    for g in groups:
        parts.append(f"<div class='group'><h3>group {g['component']}: {g['size']} images"
                     f"{' (showing ' + str(len(g['keys'])) + ')' if len(g['keys']) < g['size'] else ''}</h3>"
                     "<div class='row'>")
        for key in g["keys"]:
            kept = key == g["representative"]
            meta = info.get(key, {})
            label = html.escape(key)
            if meta.get("source"):
                label += f"<br>{html.escape(str(meta['source']))}"
            if meta.get("score") is not None:
                label += f"<br>score {float(meta['score']):.3f}"
            if key in images:
                img = f"<img alt='{html.escape(key)}' src='data:image/jpeg;base64,{thumbnail_b64(images[key], thumb)}'>"
            else:
                img = "<div>(image missing)</div>"
            parts.append(f"<figure class='{'kept' if kept else 'removed'}'>{img}<figcaption>{label}"
                         "</figcaption></figure>")
        parts.append("</div></div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_groups_page(path, manifest: pd.DataFrame, dirs: list[str], n_groups: int, per_group: int,
                      metrics: Mapping | None = None) -> int:
    """dedup's groups.html: the `n_groups` largest duplicate groups of `manifest`, their images read
    from the shard folders `dirs`. Returns how many groups it shows."""
    from pathlib import Path

    from pas.io.shards import iter_samples

    groups = largest_groups(manifest, n_groups, per_group)
    wanted = {k for g in groups for k in g["keys"]}
    images = {}
    if wanted:
        for d in dirs:
            for s in iter_samples(d):
                if s.key in wanted:
                    images[s.key] = s.image
    info = manifest.set_index("key")[["source", "score"]].loc[sorted(wanted)].to_dict("index") if wanted else {}
    Path(path).write_text(groups_html(groups, images, info, summary=metrics))
    return len(groups)
