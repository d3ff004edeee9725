"""The kNN service of the `clip_service` backend: clip-retrieval's HTTP API.

The paper (App. D.1.2) queried LAION-5B through clip-retrieval's service "asking for a maximum of 500
results per query and keeping all the default parameter values". Users who host such an index
(`clip-retrieval back`) point `retrieve.service.url` at its `/knn-service` endpoint. The request body
and the defaults are those of clip-retrieval's `ClipClient` (rom1504/clip-retrieval 2.45.0:
clip_retrieval/clip_client.py):

    POST {url}  {"text", "image", "image_url", "embedding_input", "modality", "num_images",
                 "num_result_ids", "indice_name", "deduplicate", "use_safety_model",
                 "use_violence_detector", "aesthetic_score", "aesthetic_weight", "use_mclip"}
    → [{"url", "caption", "similarity", "id"}, ...]

We speak the API rather than import `ClipClient`: `import clip_retrieval.clip_client` runs the
package's `__init__`, which imports its back end (flask, faiss, torch, open_clip, h5py, autofaiss...),
and clip-retrieval pins numpy<2 and pyarrow<16; ClipClient itself has no retries and a 3600 s timeout.
Queries run concurrently (`query_all`, at most `query_workers` in flight). The images are downloaded
by img2dataset (`pas.collect.knn_service`). No heavy imports at module level (params validation
imports this module).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

from pas.params import ParamsError, check_choice, check_range

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceParams:
    """`retrieve.service`: where the kNN service is and how to query it (ClipClient's defaults)."""

    url: str | None = None              # e.g. http://host:1234/knn-service (clip-retrieval back)
    indice_name: str = "laion5B-L-14"   # which index of the service to search
    query: str = "text"                 # text: the service embeds the prompt; embedding: send our CLIP's
    modality: str = "image"             # search the image index (or the caption index: text)
    deduplicate: bool = True            # ClipClient default
    use_safety_model: bool = True       # ClipClient default
    use_violence_detector: bool = True  # ClipClient default
    aesthetic_score: int = 9            # ClipClient default
    aesthetic_weight: float = 0.5       # ClipClient default
    use_mclip: bool = False             # ClipClient default
    timeout: float = 60.0               # seconds per kNN request
    retries: int = 3                    # extra attempts after a failed request or image download
    backoff: float = 1.0                # seconds before the first kNN retry, doubled each time
    query_workers: int = 8              # kNN requests in flight at once
    # downloads (img2dataset; machine knobs except max_side, max_pixels, opt_out, user_agent_token)
    image_timeout: float = 10.0         # seconds per image download
    workers: int = 16                   # download threads per process (img2dataset thread_count)
    processes: int = 1                  # download processes (img2dataset processes_count)
    shard_size: int = 10_000            # URLs per download shard: the unit of resume
    max_pixels: int = 50_000_000        # larger images are dropped (too_large)
    max_side: int = 1024                # longer side downscaled to this, never upscaled (0 = keep)
    # X-Robots-Tag directives that opt an image out (img2dataset's defaults); [] = ignore the header
    opt_out: list[str] = field(default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])
    user_agent_token: str = "pas"       # named in the User-Agent; "pas: noai" headers apply to us

    def __post_init__(self) -> None:
        check_choice("query", self.query, ("text", "embedding"))
        check_choice("modality", self.modality, ("image", "text"))
        check_range("aesthetic_weight", self.aesthetic_weight, 0.0, 1.0, lo_open=False, hi_open=False)
        for name in ("timeout", "image_timeout"):
            check_range(name, getattr(self, name), 0.0, None)
        check_range("backoff", self.backoff, 0.0, None, lo_open=False)
        for name in ("retries", "max_side"):
            check_range(name, getattr(self, name), 0, None, lo_open=False)
        for name in ("workers", "max_pixels", "query_workers", "processes", "shard_size"):
            check_range(name, getattr(self, name), 1, None, lo_open=False)
        if not self.user_agent_token.strip() or ":" in self.user_agent_token:
            raise ParamsError(f"user_agent_token={self.user_agent_token!r}: a non-empty word without ':'")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ParamsError(f"url={self.url!r} must start with http:// or https://")


class ServiceError(RuntimeError):
    """The kNN service failed for good (after retries) or answered something we cannot read."""


RETRY_STATUS = {429, 500, 502, 503, 504}


def _with_retries(fn, retries: int, backoff: float, what: str):
    """Call `fn()`; retry on connection errors, timeouts and RETRY_STATUS answers."""
    import requests

    for attempt in range(retries + 1):
        try:
            resp = fn()
            if resp.status_code in RETRY_STATUS and attempt < retries:
                raise requests.HTTPError(f"HTTP {resp.status_code}", response=resp)
            return resp
        except requests.RequestException as e:  # connection, timeout, retryable status
            if attempt >= retries:
                raise ServiceError(f"{what}: failed after {retries + 1} attempts: {e}") from None
            time.sleep(backoff * (2 ** attempt))


class KnnClient:
    """A ClipClient-compatible client for one service (`query()` returns the service's result dicts)."""

    def __init__(self, params: ServiceParams, num_images: int):
        if not params.url:
            raise ParamsError("retrieve.service.url: required for backend clip_service")
        self.p = params
        self.num_images = num_images
        self._local = threading.local()      # a requests.Session per thread (sessions are not thread-safe)
        self._sessions: list = []
        self._lock = threading.Lock()

    @property
    def session(self):
        import requests

        if not hasattr(self._local, "session"):
            s = requests.Session()
            s.headers["User-Agent"] = f"{self.p.user_agent_token} (clip-retrieval compatible client)"
            self._local.session = s
            with self._lock:
                self._sessions.append(s)
        return self._local.session

    def request_body(self, text: str | None = None, embedding: Sequence[float] | None = None) -> dict:
        if (text is None) == (embedding is None):
            raise ValueError("give exactly one of text or embedding")
        return {
            "text": text, "image": None, "image_url": None,
            "embedding_input": None if embedding is None else [float(x) for x in embedding],
            "modality": self.p.modality, "num_images": self.num_images, "num_result_ids": self.num_images,
            "indice_name": self.p.indice_name, "deduplicate": self.p.deduplicate,
            "use_safety_model": self.p.use_safety_model, "use_violence_detector": self.p.use_violence_detector,
            "aesthetic_score": self.p.aesthetic_score, "aesthetic_weight": self.p.aesthetic_weight,
            "use_mclip": self.p.use_mclip,
        }

    def query(self, text: str | None = None, embedding: Sequence[float] | None = None) -> list[dict]:
        """One kNN request → list of {url, caption, similarity, id} (entries without url dropped)."""
        body = json.dumps(self.request_body(text, embedding))
        what = f"kNN service {self.p.url}"
        resp = _with_retries(lambda: self.session.post(
            self.p.url, data=body, headers={"Content-Type": "application/json"}, timeout=self.p.timeout),
            self.p.retries, self.p.backoff, what)
        if resp.status_code != 200:
            raise ServiceError(f"{what}: HTTP {resp.status_code}: {resp.text[:200]}")
        try:
            data = resp.json()
        except ValueError:
            raise ServiceError(f"{what}: answer is not JSON: {resp.text[:200]!r}") from None
        if isinstance(data, dict) and "error" in data:
            raise ServiceError(f"{what}: {data['error']}")
        if not isinstance(data, list):
            raise ServiceError(f"{what}: expected a list of results, got {type(data).__name__}")
        return [{"url": r["url"], "caption": r.get("caption"),
                 "similarity": float(r.get("similarity", float("nan"))), "id": r.get("id")}
                for r in data if isinstance(r, dict) and isinstance(r.get("url"), str) and r["url"]]

    def close(self) -> None:
        for session in self._sessions:
            session.close()


def query_all(client: KnnClient, prompts: Sequence[str], embeddings: Any = None,
              progress: bool = True) -> list[list[dict]]:
    """One kNN request per prompt (the API takes one query per request), at most
    `query_workers` in flight; results in prompt order."""
    from tqdm import tqdm

    def one(i: int) -> list[dict]:
        if embeddings is not None:
            return client.query(embedding=embeddings[i])
        return client.query(text=prompts[i])

    if not prompts:
        return []
    with ThreadPoolExecutor(max_workers=min(client.p.query_workers, len(prompts))) as pool:
        return list(tqdm(pool.map(one, range(len(prompts))), total=len(prompts), desc="knn-service",
                         unit="concept", disable=not progress))
