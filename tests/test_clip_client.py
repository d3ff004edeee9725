"""clip_service backend against a local HTTP server speaking clip-retrieval's /knn-service format."""

from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from pas.collect.clip_client import KnnClient, ServiceError, ServiceParams, to_jpeg
from pas.collect.retrieve import RetrieveParams, retrieve
from pas.io.manifest import read_parquet
from pas.io.shards import iter_samples, make_key


def png(color, size=(16, 16), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


class Service:
    """A tiny clip-retrieval look-alike: POST /knn-service answers from a table, GET /img/<name> serves
    bytes; a few images misbehave (flaky 500 once, 404, not an image, too slow, too large)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.hits: dict[str, int] = {}
        self.images = {
            "red.png": png((255, 0, 0)), "green.png": png((0, 255, 0)), "blue.png": png((0, 0, 255)),
            "flaky.png": png((9, 9, 9)), "garbage.png": b"this is not an image",
            "huge.png": png((1, 2, 3), size=(300, 300)), "slow.png": png((5, 5, 5)),
            "alpha.png": png((0, 0, 0, 0), mode="RGBA"),
        }
        self.table: dict[str, list[tuple[str, float]]] = {}
        self.fail_queries = 0
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body: bytes, ctype="application/json"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                srv.requests.append(body)
                if self.path != "/knn-service":
                    return self._send(404, b"{}")
                if srv.fail_queries > 0:
                    srv.fail_queries -= 1
                    return self._send(503, b"busy")
                key = body["text"] if body["text"] is not None else "embedding"
                if key == "error please":
                    return self._send(200, json.dumps({"error": "indice not found"}).encode())
                rows = srv.table.get(key, [])[: body["num_images"]]
                out = [{"url": f"{srv.base}/img/{name}", "caption": f"cap {name}", "similarity": s, "id": i}
                       for i, (name, s) in enumerate(rows)]
                out.append({"caption": "no url here", "similarity": 0.1, "id": 99})   # skipped
                self._send(200, json.dumps(out).encode())

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                srv.hits[name] = srv.hits.get(name, 0) + 1
                if name == "flaky.png" and srv.hits[name] == 1:
                    return self._send(500, b"oops", "text/plain")
                if name == "slow.png":
                    time.sleep(0.6)
                if name not in srv.images:
                    return self._send(404, b"nope", "text/plain")
                self._send(200, srv.images[name], "image/png")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.url = self.base + "/knn-service"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def service():
    s = Service()
    yield s
    s.close()


def params(url, **kw):
    svc = {"url": url, "retries": 1, "backoff": 0.0, "timeout": 5.0, "image_timeout": 0.3,
           "workers": 4, "max_pixels": 200 * 200, **kw}
    return RetrieveParams(backend="clip_service", k_retrieve=10, maxcount=2, service=svc)


def test_request_body_matches_clip_client_defaults():
    c = KnnClient(ServiceParams(url="http://127.0.0.1:1/knn-service"), num_images=500)
    b = c.request_body(text="a photo of pizza.")
    assert b == {"text": "a photo of pizza.", "image": None, "image_url": None, "embedding_input": None,
                 "modality": "image", "num_images": 500, "num_result_ids": 500, "indice_name": "laion5B-L-14",
                 "deduplicate": True, "use_safety_model": True, "use_violence_detector": True,
                 "aesthetic_score": 9, "aesthetic_weight": 0.5, "use_mclip": False}
    assert c.request_body(embedding=np.array([0.5, -0.25], np.float32))["embedding_input"] == [0.5, -0.25]
    with pytest.raises(ValueError):
        c.request_body()


def test_retrieve_from_service(service, tmp_path):
    service.table = {
        "a photo of apple.": [("red.png", 0.31), ("green.png", 0.30), ("flaky.png", 0.29), ("garbage.png", 0.2),
                              ("missing.png", 0.19), ("slow.png", 0.18), ("huge.png", 0.17)],
        "a photo of pear.": [("green.png", 0.35), ("blue.png", 0.25), ("green.png", 0.2), ("alpha.png", 0.1)],
    }
    out = tmp_path / "retrieved"
    m = retrieve(["apple", "pear", "kiwi"], out, params(service.url), progress=False)
    assert [r["text"] for r in service.requests] == ["a photo of apple.", "a photo of pear.", "a photo of kiwi."]
    assert all(r["num_images"] == 10 and r["modality"] == "image" for r in service.requests)
    assert m["dropped_fetch_error"] == 2          # missing.png (404), slow.png (timeout ×2)
    assert m["dropped_decode_error"] == 1         # garbage.png
    assert m["dropped_too_large"] == 1            # huge.png: 300×300 > max_pixels, not decoded
    assert service.hits["flaky.png"] == 2         # 500 once, then retried
    assert service.hits["green.png"] == 1         # fetched once although two concepts retrieved it
    assert m["n_unique"] == 5 and m["n_images"] == 6
    assert m["concepts_zero_hits"] == 1 and m["hits_per_concept_min"] == 0 and m["hits_per_concept_max"] == 3
    idx = read_parquet(out / "index.parquet")
    samples = {s.key: s for s in iter_samples(out)}
    assert set(idx.key) == set(samples)
    green = samples[make_key("r", f"{service.base}/img/green.png")]
    assert green.meta["concepts"] == ["pear", "apple"] and green.meta["similarities"] == [0.35, 0.30]
    assert green.meta["source"] == "real" and green.meta["pool_key"] is None
    assert green.meta["url"].endswith("/img/green.png") and green.meta["caption"] == "cap green.png"
    assert green.ext == "jpg" and green.pil().getpixel((8, 8))[1] > 240
    alpha = samples[make_key("r", f"{service.base}/img/alpha.png")]
    assert alpha.pil().getpixel((3, 3)) == (255, 255, 255)   # transparent → white


def test_query_retries_then_succeeds(service):
    service.table = {"x": [("red.png", 0.5)]}
    service.fail_queries = 1
    c = KnnClient(ServiceParams(url=service.url, retries=2, backoff=0.0), num_images=5)
    res = c.query(text="x")
    assert [r["url"].rsplit("/", 1)[-1] for r in res] == ["red.png"] and len(service.requests) == 2


def test_service_errors_are_clear(service, tmp_path):
    c = KnnClient(ServiceParams(url=service.url, retries=0), num_images=5)
    with pytest.raises(ServiceError, match="indice not found"):
        c.query(text="error please")
    service.fail_queries = 5
    with pytest.raises(ServiceError, match="HTTP 503"):
        c.query(text="x")
    dead = KnnClient(ServiceParams(url="http://127.0.0.1:9/knn-service", retries=1, backoff=0.0,
                                   timeout=1.0), num_images=5)
    with pytest.raises(ServiceError, match="failed after 2 attempts"):
        dead.query(text="x")
    out = tmp_path / "out"
    with pytest.raises(ServiceError):
        retrieve(["a"], out, params("http://127.0.0.1:9/knn-service"), progress=False)
    assert not out.exists()


def test_embedding_query_mode(service, tmp_path):
    service.table = {"embedding": [("blue.png", 0.4)]}

    class Enc:
        fingerprint = "f"

        def encode_texts(self, texts, batch_size=256):
            return np.ones((len(texts), 4), np.float32) / 2

    m = retrieve(["plum"], tmp_path / "o", params(service.url, query="embedding"), encoder=Enc(), progress=False)
    assert service.requests[0]["text"] is None and service.requests[0]["embedding_input"] == [0.5] * 4
    assert m["n_unique"] == 1


def test_to_jpeg_guards():
    assert to_jpeg(b"\x89PNG\r\n\x1a\n broken", 10**6, 0) == (None, "decode_error")
    assert to_jpeg(png((1, 1, 1), (50, 40)), 1999, 0) == (None, "too_large")
    data, why = to_jpeg(png((1, 1, 1), (50, 40)), 10**6, 20)
    assert why is None and Image.open(io.BytesIO(data)).size == (20, 16)
