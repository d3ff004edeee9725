"""The dataset card of the final dataset: data/dataset/README.md.

A Hugging Face dataset card: YAML metadata that makes `datasets.load_dataset("data/dataset")` read
the webdataset shards with the declared sample schema (`pas.curate.export.SAMPLE_FIELDS`, so no field
is lost to schema inference from the first rows), then what the dataset is, how it was made and what
it does not guarantee. Pure: the same inputs give the same bytes (no dates, hosts or commits; the
commit that made a dataset is the one whose dvc.lock lists its hash).
"""

from __future__ import annotations

from typing import Any, Mapping

import yaml

from pas.curate.export import SAMPLE_FIELDS
from pas.summary import FUNNEL


def hf_features(image_ext: str = "jpg") -> list[dict]:
    """`dataset_info.features` of the card: the image, the sample JSON as a struct, the tar keys."""
    struct = [{"name": k, **({"list": t[0]} if isinstance(t, list) else {"dtype": t})}
              for k, t in SAMPLE_FIELDS.items()]
    return [{"name": image_ext, "dtype": "image"}, {"name": "json", "struct": struct},
            {"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}]


def _size_class(n: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < bound:
            return name
    return "10M<n<100M"


def _table(rows: list[tuple], header: tuple) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join("" if v is None else (f"{v:,}" if isinstance(v, int) else str(v)) for v in r)
            + " |" for r in rows]
    return "\n".join(out)


def dataset_card(*, domain: Mapping[str, Any], funnel: Mapping[str, Any], prune: Mapping[str, Any],
                 concepts: Mapping[str, Any] | None = None, license: str = "other",
                 image_ext: str = "jpg", shard_glob: str = "shard-*.tar") -> str:
    """The card's text. `funnel`: metrics/dataset.json; `prune`: the prune summary (n_in, stop
    reason, fronts); `concepts`: metrics/concepts.json (|B| and coverage), if known."""
    final = funnel.get("final", {})
    n = int(final.get("n", 0))
    name = str(domain.get("name", "?"))
    meta = {
        "pretty_name": f"Precision at Scale: {name}",
        "license": license,
        "task_categories": ["image-classification"],
        "tags": ["precision-at-scale", "self-supervised-pretraining", "synthetic", "webdataset"],
        "size_categories": [_size_class(n)],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": shard_glob}]}],
        "dataset_info": {"features": hf_features(image_ext)},
    }
    funnel_rows = [(s, funnel[s].get("n"), funnel[s].get("real"), funnel[s].get("synthetic"))
                   for s in FUNNEL if s in funnel]
    schema_rows = [(f"`{k}`", f"list of {t[0]}" if isinstance(t, list) else t)
                   for k, t in SAMPLE_FIELDS.items()]
    b = (concepts or {}).get("B_after_validation")
    cov = (concepts or {}).get("coverage") or {}
    cov_txt = "; ".join(f"{k}: {v.get('covered', 0):.1%} of {v.get('classes', '?')} classes"
                        for k, v in sorted(cov.items()))
    parts = [
        "---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
        f"# Precision at Scale: {name}", "",
        f"A domain-specific image dataset for *{name}*"
        + (f" ({domain['description']})" if domain.get("description") else "")
        + ", built by [pas](https://arxiv.org/abs/2407.03463)'s pipeline: concepts from LLMs, CLIP retrieval, "
          "Stable Diffusion, SSCD dedup, test-set leakage removal, OOD scoring and Pareto pruning.", "",
        f"**{n:,} images**: {int(final.get('real', 0)):,} real, {int(final.get('synthetic', 0)):,} synthetic"
        + (f"; {b:,} concepts" if b is not None else "") + ".", "",
        "## Loading", "",
        "```python",
        "from datasets import load_dataset",
        "ds = load_dataset(\"path/to/data/dataset\", split=\"train\")  # this folder",
        f"ds[0][\"{image_ext}\"], ds[0][\"json\"][\"concepts\"]",
        "```", "",
        f"Or as webdataset shards (`{shard_glob}`, one `.{image_ext}` + one `.json` per sample, in key "
        "order); `index.parquet` lists every sample with its shard and provenance.", "",
        "## How it was made", "",
        "Images per stage (the funnel, metrics/dataset.json):", "",
        _table(funnel_rows, ("stage", "images", "real", "synthetic")), "",
        f"Pruning: {prune.get('n_in', 0):,} scored images in {prune.get('fronts', 0):,} Pareto fronts; "
        f"stop `{prune.get('stop_reason', '?')}` after {prune.get('stop_x', 0):,} removed.",
        *([f"Concept coverage of the eval sets' class names: {cov_txt}."] if cov_txt else []), "",
        "The exact params, code and inputs are the commit of the producing repository whose `dvc.lock` "
        "records this folder's hash (`dvc params diff`, `dvc exp show`).", "",
        "## Sample schema", "",
        "Every sample's `json` has exactly these fields, null (or an empty list) where its source has "
        "no value:", "",
        _table(schema_rows, ("field", "type")), "",
        "## Licence and provenance", "",
        f"Card licence: `{license}`. Real images keep their source's terms: `url` (web sources) or "
        "`pool_key` / `path` (a local pool) say where each came from, and `license` carries the source's "
        "licence where it gives one. Synthetic images are generated by the configured Stable Diffusion "
        "model and follow its licence.", "",
        "Takedown: list a sample's key or URL in the producing repository's takedown file "
        "(params `prune.takedown`); the next `dvc repro` leaves it out.", "",
        "## Known limitations", "",
        "- Domain precision is bounded by the retrieval model and the concept bank; see metrics/precision.json "
        "where the pool's images carry domain labels.",
        "- Near-duplicates below the dedup threshold λ_dup and test-set look-alikes below λ_leak remain.",
        "- Synthetic images inherit the biases of the diffusion model and the captioning LLM.",
        "",
    ]
    return "\n".join(parts)
