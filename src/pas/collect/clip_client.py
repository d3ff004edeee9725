"""Second retrieval backend: a remote kNN service with clip-retrieval's HTTP API.

The paper (App. D.1.2) queried LAION-5B through clip-retrieval's service "asking for a maximum of 500
results per query and keeping all the default parameter values". Users who host such an index
(`clip-retrieval back`) point `retrieve.service.url` at its `/knn-service` endpoint. The request body
and the defaults mirror clip-retrieval's `ClipClient` (rom1504/clip-retrieval: clip_retrieval/clip_client.py):

    POST {url}  {"text", "image", "image_url", "embedding_input", "modality", "num_images",
                 "num_result_ids", "indice_name", "deduplicate", "use_safety_model",
                 "use_violence_detector", "aesthetic_score", "aesthetic_weight", "use_mclip"}
    → [{"url", "caption", "similarity", "id"}, ...]

Images are then fetched from the returned URLs (timeouts, retries with backoff, a thread pool),
checked against decompression bombs before decoding, and re-encoded as RGB JPEG.
No heavy imports at module level (params validation imports this module).
"""

from __future__ import annotations

import io
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
    image_timeout: float = 10.0         # seconds per image download
    retries: int = 3                    # extra attempts after a failed request (connection, 5xx, 429, timeout)
    backoff: float = 1.0                # seconds before the first retry, doubled each time
    workers: int = 16                   # concurrent image downloads
    max_pixels: int = 50_000_000        # skip larger images (decompression bombs) before decoding
    max_side: int = 1024                # downscale longer side to this before storing (0 = keep)

    def __post_init__(self) -> None:
        check_choice("query", self.query, ("text", "embedding"))
        check_choice("modality", self.modality, ("image", "text"))
        check_range("aesthetic_weight", self.aesthetic_weight, 0.0, 1.0, lo_open=False, hi_open=False)
        for name in ("timeout", "image_timeout"):
            check_range(name, getattr(self, name), 0.0, None)
        check_range("backoff", self.backoff, 0.0, None, lo_open=False)
        for name in ("retries", "max_side"):
            check_range(name, getattr(self, name), 0, None, lo_open=False)
        for name in ("workers", "max_pixels"):
            check_range(name, getattr(self, name), 1, None, lo_open=False)
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
    raise AssertionError("unreachable")


class KnnClient:
    """A ClipClient-compatible client for one service (`query()` returns the service's result dicts)."""

    def __init__(self, params: ServiceParams, num_images: int):
        import requests

        if not params.url:
            raise ParamsError("retrieve.service.url: required for backend clip_service")
        self.p = params
        self.num_images = num_images
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "pas-retrieve (clip-retrieval compatible client)"

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
        out = []
        for r in data:
            if isinstance(r, dict) and isinstance(r.get("url"), str) and r["url"]:
                out.append({"url": r["url"], "caption": r.get("caption"),
                            "similarity": float(r.get("similarity", float("nan"))), "id": r.get("id")})
        return out

    def fetch(self, url: str) -> bytes:
        """GET an image's bytes with timeout and retries; raises ServiceError for good failures."""
        if not url.startswith(("http://", "https://")):
            raise ServiceError(f"{url[:100]!r}: not an http(s) URL")
        resp = _with_retries(lambda: self.session.get(url, timeout=self.p.image_timeout),
                             self.p.retries, self.p.backoff, f"image {url[:100]}")
        if resp.status_code != 200:
            raise ServiceError(f"image {url[:100]}: HTTP {resp.status_code}")
        return resp.content

    def close(self) -> None:
        self.session.close()


def to_jpeg(data: bytes, max_pixels: int, max_side: int) -> tuple[bytes | None, str | None]:
    """Decode any image safely → (RGB JPEG bytes, None) or (None, reason): too_large | decode_error.

    The pixel count is read from the header before decoding (Pillow decodes lazily); transparency is
    composited on white.
    """
    from PIL import Image

    from pas.io.shards import encode_image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                return None, "too_large"
            im.load()
            if im.mode in ("RGBA", "LA", "P", "PA"):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            im = im.convert("RGB")
            if max_side and max(im.size) > max_side:
                im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            return encode_image(im, "jpg"), None
    except Image.DecompressionBombError:
        return None, "too_large"
    except Exception:  # noqa: BLE001 — any undecodable payload is counted, never fatal
        return None, "decode_error"


def fetch_all(client: KnnClient, urls: Sequence[str]) -> list[tuple[bytes | None, str | None]]:
    """Download and re-encode `urls` concurrently; results in input order: (jpeg, None) | (None, reason)."""
    p = client.p

    def one(url: str) -> tuple[bytes | None, str | None]:
        try:
            data = client.fetch(url)
        except ServiceError as e:
            log.debug("%s", e)
            return None, "fetch_error"
        return to_jpeg(data, p.max_pixels, p.max_side)

    if not urls:
        return []
    with ThreadPoolExecutor(max_workers=min(p.workers, len(urls))) as pool:
        return list(pool.map(one, urls))


def query_all(client: KnnClient, prompts: Sequence[str], embeddings: Any = None,
              progress: bool = True) -> list[list[dict]]:
    """One kNN request per concept prompt (the API takes one query per request)."""
    from tqdm import tqdm

    out = []
    for i, prompt in enumerate(tqdm(prompts, desc="knn-service", unit="concept", disable=not progress)):
        if embeddings is not None:
            out.append(client.query(embedding=embeddings[i]))
        else:
            out.append(client.query(text=prompt))
    return out
