"""Domain precision: what fraction of the real images after each stage belong to the domain.

An evaluation, never an input of curation: the pool's categories (for openclipart its folders,
`food/fruit`, …) are ground truth that only this module reads (tests/test_domain_precision.py shuffles
them and checks that no curation output moves). An image is in the domain when its pool category is
one of `precision.domain_categories` or below one (`food` covers `food/fruit`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import pandas as pd

from pas.params import ParamsError

# the stages whose real images are counted, in pipeline order
STAGES = ("retrieve", "dedup", "leakage", "final")


@dataclass(frozen=True)
class PrecisionParams:
    """params.yaml `precision:` — which pool categories are the domain ([] = not measured)."""

    domain_categories: list[str] = field(default_factory=list)

    def __post_init__(self):
        for c in self.domain_categories:
            if not isinstance(c, str) or not c.strip("/"):
                raise ParamsError(f"domain_categories: {c!r} must be a category path such as 'food'")


def in_domain(categories: pd.Series, domain_categories: Iterable[str]) -> pd.Series:
    """Boolean per row: the category equals a domain category or lies below one."""
    cats = categories.fillna("").astype(str)
    hit = pd.Series(False, index=categories.index)
    for d in domain_categories:
        d = d.strip("/")
        hit |= (cats == d) | cats.str.startswith(d + "/")
    return hit


def domain_precision(stage_keys: Mapping[str, Iterable[str]], pool_index: pd.DataFrame,
                     domain_categories: Iterable[str]) -> dict:
    """{stage: {n_real, n_domain, domain_precision}} for the real (pool) images of each stage, plus
    `pool`: the same over the whole pool (the precision of picking images at random)."""
    domain_categories = list(domain_categories)
    label = dict(zip(pool_index["key"].astype(str), in_domain(pool_index["category"], domain_categories)))

    def row(keys) -> dict:
        known = [label[k] for k in keys if k in label]
        n, d = len(known), int(sum(known))
        return {"n_real": n, "n_domain": d, "domain_precision": round(d / n, 6) if n else None}

    out = {"domain_categories": domain_categories, "pool": row(label)}
    for stage in STAGES:
        if stage in stage_keys:
            out[stage] = row(sorted(set(map(str, stage_keys[stage]))))
    return out
