"""Uncurated real-data retrieval (paper §3.2).

"For each concept c, we generate a textual embedding t_c = TE(c) ... We search an extensive index of
uncurated images, employing the same vision-language model's visual encoder ... The selection of images
is based on the cosine similarity sim(t_c, v_I)." → I_real.

Two backends:
- `pool` (default): the local pool of the `pool` stage (shards + CLIP embeddings + faiss index). Text
  embeddings of all concepts are searched in batches (one faiss call per batch of concepts); the pool's
  image bytes are copied unchanged.
- `clip_service`: a remote clip-retrieval kNN service (LAION-5B in the paper), queried concurrently
  in resumable batches, the hits deduplicated by URL and downloaded with img2dataset, each step
  streamed (`pas.collect.knn_service`); progress lives in a cache folder outside the DVC outs.

An image retrieved by several concepts is stored once; its metadata lists every (concept, similarity),
best first. Keys never come from concept text: pool images keep their pool key, service images get
`make_key("r", url)`.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Protocol, Sequence

import numpy as np

from pas.collect.clip_client import ServiceParams
from pas.params import ParamsError, build, check_choice, check_range, renamed

log = logging.getLogger(__name__)
SHARD_PREFIX = "retrieved"


@dataclass(frozen=True)
class RetrieveParams:
    """`retrieve:` section (+ top-level `k_retrieve`)."""

    k_retrieve: int = 500                   # pool images retrieved per concept (paper: 500)
    prompt_template: str = "a photo of {c}."  # text embedded as t_c; {c} is replaced by the concept
    backend: str = "pool"                   # pool (local faiss index) | clip_service (remote kNN API)
    # concepts per text-encoding batch and per faiss search call; clip_service: per kNN batch (one
    # hits file each, the unit of resume)
    batch_size: int = 256
    shard_size: int = 10_000                # images per output shard
    service: dict = field(default_factory=dict)  # clip_service settings: see ServiceParams

    REMOVED_KEYS: ClassVar[dict[str, str]] = {"maxcount": renamed("retrieve.shard_size")}

    def __post_init__(self) -> None:
        check_range("k_retrieve", self.k_retrieve, 1, None, lo_open=False)
        check_choice("backend", self.backend, ("pool", "clip_service"))
        check_range("batch_size", self.batch_size, 1, None, lo_open=False)
        check_range("shard_size", self.shard_size, 1, None, lo_open=False)
        if "{c}" not in self.prompt_template:
            raise ParamsError(f"prompt_template={self.prompt_template!r} must contain {{c}}")
        sp = self.service_params()
        if self.backend == "clip_service" and not sp.url:
            raise ParamsError("service.url: required for backend clip_service")

    def service_params(self) -> ServiceParams:
        return build(ServiceParams, {"retrieve.service": dict(self.service)}, section="retrieve.service")


class TextEncoder(Protocol):
    """What retrieval needs of a CLIP (`pas.models.clip.Clip` satisfies it)."""

    fingerprint: str

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray: ...


class PoolError(ValueError):
    """The pool folder is missing, incomplete or built with another CLIP."""


def prompt_for(concept: str, template: str) -> str:
    """The text embedded for a concept (plain substitution: braces in concepts are harmless)."""
    return template.replace("{c}", concept)


# --------------------------------------------------------------------------------------------- pool
@dataclass
class Pool:
    dir: Path
    meta: dict
    index: Any              # pandas DataFrame: key, shard, ... (row i ↔ faiss id i)
    faiss_index: Any


def load_pool(pool_dir: str | Path) -> Pool:
    """Read `pool.json`, `index.parquet` and `faiss.index`; check they agree."""
    import faiss

    from pas.io.manifest import read_parquet

    d = Path(pool_dir)
    for name in ("pool.json", "index.parquet", "faiss.index"):
        if not (d / name).is_file():
            raise PoolError(f"{d}: not a pool folder (missing {name}); run `dvc repro pool`")
    meta = json.loads((d / "pool.json").read_text())
    index = read_parquet(d / "index.parquet")
    fi = faiss.read_index(str(d / "faiss.index"))
    if fi.ntotal != len(index):
        raise PoolError(f"{d}: faiss.index holds {fi.ntotal} vectors but index.parquet {len(index)} rows")
    if "dim" in meta and int(meta["dim"]) != fi.d:
        raise PoolError(f"{d}: pool.json says dim={meta['dim']} but faiss.index has d={fi.d}")
    return Pool(dir=d, meta=meta, index=index, faiss_index=fi)


def check_pool_model(pool: Pool, encoder: TextEncoder) -> None:
    """Refuse a pool embedded by another CLIP than the configured one (cosines would be meaningless)."""
    fp = pool.meta.get("clip_fingerprint")
    if fp != encoder.fingerprint:
        raise PoolError(
            f"{pool.dir}/pool.json: pool was embedded with CLIP {str(fp)[:16]}… "
            f"({pool.meta.get('clip_dir', '?')}) but the configured CLIP is {encoder.fingerprint[:16]}…; "
            "rebuild the pool with the same model (`dvc repro pool`) or point retrieve at its CLIP")


def search(faiss_index: Any, T: np.ndarray, k: int, batch_size: int,
           progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product (= cosine: both sides L2-normalised) for every row of T.

    T: (C, D) concept text embeddings. Returns S (C, k') similarities and I (C, k') pool row ids,
    k' = min(k, ntotal), best first; one faiss search call per batch of concepts.
    """
    from tqdm import tqdm

    k = min(k, faiss_index.ntotal)
    C = len(T)
    S = np.zeros((C, k), np.float32)
    I = np.full((C, k), -1, np.int64)
    if k == 0 or C == 0:
        return S, I
    T = np.ascontiguousarray(T, dtype=np.float32)
    for b in tqdm(range(0, C, batch_size), desc="faiss search", unit="batch", disable=not progress):
        S[b:b + batch_size], I[b:b + batch_size] = faiss_index.search(T[b:b + batch_size], k)
    return S, I


@dataclass(frozen=True)
class Hits:
    """Every retrieved image's (concept, similarity) list, best first, as arrays (CSR), not a tuple
    per hit: image i (`keys[i]`, in pool order) was retrieved by `concepts[code[j]]` with similarity
    `sim[j]` for j in `start[i]:start[i + 1]`."""

    concepts: Sequence[str]
    keys: np.ndarray            # object (str), one per image
    start: np.ndarray           # int64, len(keys) + 1
    code: np.ndarray            # int64, index into `concepts`, one per hit
    sim: np.ndarray             # float64, one per hit

    def __len__(self) -> int:
        return len(self.keys)

    @functools.cached_property
    def _pos(self):
        import pandas as pd

        return pd.Index(self.keys)          # a hash table over the keys, no Python int per key

    def __contains__(self, key: str) -> bool:
        return key in self._pos

    def positions(self, keys: Sequence[str]) -> np.ndarray:
        pos = self._pos.get_indexer(keys)
        if (pos < 0).any():
            raise KeyError(f"{list(keys)[int(np.argmax(pos < 0))]!r}: no hits")
        return pos

    def of(self, key: str) -> tuple[list[str], list[float]]:
        """One image's concepts and similarities, best first."""
        i = self._pos.get_loc(key)
        a, b = self.start[i], self.start[i + 1]
        return [self.concepts[c] for c in self.code[a:b].tolist()], self.sim[a:b].tolist()

    def counts(self) -> dict[str, int]:
        """Images per concept."""
        counts: Counter = Counter()
        for c, n in zip(self.concepts, np.bincount(self.code, minlength=len(self.concepts)).tolist()):
            counts[c] += n
        return counts


def merge_hits(concepts: Sequence[str], S: np.ndarray, I: np.ndarray, keys: Any) -> Hits:
    """Invert per-concept top-k lists into per-image (concept, similarity) lists.

    `keys`: the pool's keys by faiss id (only the hit ones are taken). Similarities are rounded to 6
    decimals (stable metadata); each image's hits are sorted by similarity descending, then concept.
    Ids < 0 (faiss: fewer results than k) are skipped.
    """
    concepts = list(concepts)
    I = np.asarray(I, np.int64)
    ids, S = I.ravel(), np.asarray(S).ravel()
    code = np.repeat(np.arange(len(concepts), dtype=np.int64), I.shape[1] if I.ndim == 2 else 0)
    hit = ids >= 0
    ids, code = ids[hit], code[hit]
    # Python's round (correctly rounded), as the metadata always had it; np.round can differ by an ulp
    sim = np.fromiter((round(x, 6) for x in S[hit].astype(np.float64).tolist()), np.float64, len(ids))
    name_rank = np.empty(len(concepts), np.int64)
    name_rank[sorted(range(len(concepts)), key=concepts.__getitem__)] = np.arange(len(concepts))
    order = np.lexsort((name_rank[code], -sim, ids))     # stable: equal names keep concept order
    ids, code, sim = ids[order], code[order], sim[order]
    first = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, np.int64)
    take = getattr(keys, "take", None)
    hit_keys = np.asarray(take(ids[first]) if take else np.asarray(keys)[ids[first]], dtype=object)
    return Hits(concepts, hit_keys, np.r_[first, len(ids)].astype(np.int64), code, sim)


def summary(concepts: Sequence[str], counts: dict[str, int], n_images: int, n_unique: int) -> dict:
    """The shared metrics of both backends from the stored images' hits per concept."""
    per = np.array([counts.get(c, 0) for c in concepts] or [0])
    return {
        "n_concepts": len(concepts),
        "n_images": int(n_images),
        "n_unique": int(n_unique),
        "hits_per_concept_min": int(per.min()),
        "hits_per_concept_median": float(np.median(per)),
        "hits_per_concept_max": int(per.max()),
        "concepts_zero_hits": int((per == 0).sum()) if concepts else 0,
    }


# ------------------------------------------------------------------------------------------- output
OUT_FILES = ("index.parquet", "hits.parquet")     # besides our shards: what a rerun first removes


def _meta(key: str, concepts: list[str], sims: list[float], extra: dict) -> dict:
    return {"key": key, "source": "real", "concepts": concepts, "similarities": sims, **extra}


INDEX_COLUMNS = ["key", "shard", "pool_key", "path", "url", "n_concepts", "concept", "similarity", "concepts",
                 "similarities"]
PROVENANCE = ("pool_key", "path", "url")       # index columns taken from a sample's extra meta


def write_images(samples: Iterable[tuple[str, bytes, str, dict]], hits: Hits, out_dir: Path,
                 maxcount: int, total: int | None = None):
    """Write (key, image bytes, ext, extra meta) samples that are in `hits` to shards. Returns their
    key, shard and `PROVENANCE` columns in write order (a DataFrame; `write_index` adds the hits'
    columns): the writer's keys and shard numbers and one list per field, no dict per image."""
    import pandas as pd
    from tqdm import tqdm

    from pas.io.shards import ShardWriter

    extra_cols: dict[str, list] = {c: [] for c in PROVENANCE}
    with ShardWriter(out_dir, prefix=SHARD_PREFIX, maxcount=maxcount) as w:
        for key, data, ext, extra in tqdm(samples, desc="write retrieved", unit="img", total=total):
            w.write(key, data, _meta(key, *hits.of(key), extra), ext=ext)
            for c, col in extra_cols.items():
                col.append(extra.get(c))
    if not w.n_samples:
        return pd.DataFrame([], columns=["key", "shard", *PROVENANCE])
    head = w.index_frame()
    return pd.DataFrame({"key": head["key"], "shard": head["shard"], **extra_cols})


def write_index(written, hits: Hits, out_dir: Path) -> None:
    """index.parquet (one row per stored image, by key: `write_images`'s columns + each image's hits)
    and hits.parquet (concept, rank, key, similarity)."""
    import pandas as pd

    from pas.io.manifest import write_parquet
    from pas.io.shards import write_index as write_shard_index

    keys = written["key"]
    pos = hits.positions(keys)
    a, b = hits.start[pos], hits.start[pos + 1]
    # the list columns stay Python lists (an arrow list column would change the file's pandas
    # metadata), of the concept names' own str objects
    names, sim = np.asarray(list(hits.concepts), dtype=object)[hits.code].tolist(), hits.sim.tolist()
    data = {c: written[c] for c in written.columns}
    data.update(n_concepts=(b - a).tolist(), concept=[names[i] for i in a.tolist()],
                similarity=[sim[i] for i in a.tolist()],
                concepts=[names[i:j] for i, j in zip(a.tolist(), b.tolist())],
                similarities=[sim[i:j] for i, j in zip(a.tolist(), b.tolist())])
    names = sim = None
    write_shard_index(pd.DataFrame(data if len(keys) else [], columns=INDEX_COLUMNS), out_dir)
    write_parquet(hits_frame(keys, hits, pos), out_dir / "hits.parquet", sort_by=None)


def hits_frame(keys: Sequence[str], hits: Hits, pos: np.ndarray):
    """hits.parquet's table: a row per (concept, image) of the images `keys` (at `pos` in `hits`),
    by concept, similarity descending, then key; `rank` counts within the concept. Built from the
    hits' arrays, not a tuple per hit."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    n = hits.start[pos + 1] - hits.start[pos]
    image = np.repeat(np.arange(len(pos), dtype=np.int64), n)
    j = np.repeat(hits.start[pos] - np.r_[0, np.cumsum(n)[:-1]], n) + np.arange(int(n.sum()))
    concept, sim = hits.code[j], hits.sim[j]
    if not len(concept):                # as a frame of no rows: object columns, rank int64
        return pd.DataFrame({"concept": [], "rank": np.zeros(0, np.int64), "key": [],
                             "similarity": []}).astype({"concept": object, "key": object, "similarity": object})
    # the str columns as pandas infers them from str values (pandas 3: arrow-backed), as a frame of
    # tuples had them; taken by position, so no str object is made per hit or per key
    code: dict[str, int] = {}                   # one number per distinct name
    concept = np.array([code.setdefault(c, len(code)) for c in hits.concepts], np.int64)[concept]
    names = pd.Series(list(code)).array
    concept_rank = np.empty(len(names), np.int64)
    concept_rank[np.asarray(pc.sort_indices(pa.array(names)))] = np.arange(len(names))
    keys = pd.Series(keys).array
    key_rank = np.empty(len(keys), np.int64)      # sort_indices: UTF-8 byte order, which is str order
    key_rank[np.asarray(pc.sort_indices(pa.array(keys)))] = np.arange(len(keys))
    order = np.lexsort((key_rank[image], -sim, concept_rank[concept]))
    c = concept_rank[concept][order]
    step = np.arange(len(c))
    first = np.maximum.accumulate(np.where(np.r_[True, c[1:] != c[:-1]], step, 0))
    return pd.DataFrame({"concept": names.take(concept[order]), "rank": step - first,
                         "key": keys.take(image[order]), "similarity": sim[order]})


def _pool_samples(pool: Pool, wanted: Hits) -> Iterator[tuple[str, bytes, str, dict]]:
    """Stream the pool's samples that have hits, in pool order; only shards holding one are read."""
    from pas.io.shards import iter_samples

    shards = sorted(set(pool.index.loc[pool.index["key"].isin(wanted.keys), "shard"]))
    for shard in shards:
        path = pool.dir / shard
        if not path.is_file():
            raise PoolError(f"{path}: shard listed in index.parquet is missing")
        for s in iter_samples(path):
            if s.key in wanted:
                # provenance: the file's path in the pool folder reaches the final dataset's index
                yield s.key, s.image, s.ext, {"pool_key": s.key, "path": s.meta.get("path")}


def retrieve_from_pool(concepts: Sequence[str], encoder: TextEncoder, pool_dir: str | Path,
                       out_dir: str | Path, params: RetrieveParams, progress: bool = True) -> dict:
    """Backend `pool`: embed prompts, batched faiss top-k, merge, copy the pool's bytes. Returns metrics."""
    from pas.io.shards import clean_out

    t0 = time.perf_counter()
    pool = load_pool(pool_dir)
    check_pool_model(pool, encoder)
    prompts = [prompt_for(c, params.prompt_template) for c in concepts]
    T = encoder.encode_texts(prompts, batch_size=params.batch_size) if prompts \
        else np.zeros((0, pool.faiss_index.d), np.float32)
    if len(T) and T.shape[1] != pool.faiss_index.d:
        raise PoolError(f"{pool.dir}: pool embeddings have dim {pool.faiss_index.d}, "
                        f"text embeddings {T.shape[1]}")
    S, I = search(pool.faiss_index, T, params.k_retrieve, params.batch_size, progress)
    hits = merge_hits(concepts, S, I, pool.index["key"])
    out = Path(out_dir)
    clean_out(out, SHARD_PREFIX, OUT_FILES)
    written = write_images(_pool_samples(pool, hits), hits, out, params.shard_size, total=len(hits))
    if len(written) < len(hits):
        missing = sorted(set(hits.keys).difference(written["key"]))
        raise PoolError(f"{pool.dir}: {len(missing)} indexed key(s) not found in the shards, "
                        f"e.g. {missing[0]!r}")
    write_index(written, hits, out)
    m = summary(concepts, hits.counts(), len(hits.code), len(hits))
    m.update(backend="pool", k_retrieve=params.k_retrieve, k_effective=int(S.shape[1]),
             pool_size=int(pool.faiss_index.ntotal), seconds=time.perf_counter() - t0)
    return m


def retrieve(concepts: Sequence[str], out_dir: str | Path, params: RetrieveParams,
             encoder: TextEncoder | None = None, pool_dir: str | Path | None = None,
             progress: bool = True, cache_dir: str | Path | None = None) -> dict:
    """Run the configured backend; returns the metrics dict. `cache_dir`: where `clip_service` keeps
    its resumable progress (required for it)."""
    if params.backend == "pool":
        if encoder is None or pool_dir is None:
            raise ParamsError("retrieve.backend=pool needs the CLIP model and the pool folder")
        return retrieve_from_pool(concepts, encoder, pool_dir, out_dir, params, progress)
    if cache_dir is None:
        raise ParamsError("retrieve.backend=clip_service needs a cache folder")
    from pas.collect.knn_service import retrieve_from_service

    return retrieve_from_service(concepts, out_dir, cache_dir, params, encoder, progress)


__all__ = ["RetrieveParams", "Pool", "PoolError", "load_pool", "check_pool_model", "search",
           "Hits", "merge_hits", "summary", "retrieve", "retrieve_from_pool", "prompt_for"]
