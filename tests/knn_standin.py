"""Stand-ins on 127.0.0.1 for retrieval at LAION scale: a kNN service and the web it points at.

- POST /knn-service copies `clip-retrieval back` (rom1504/clip-retrieval 2.45.0,
  clip_retrieval/clip_back.py `KnnService`): the JSON body ClipClient sends (text / embedding_input,
  num_images, indice_name, modality, ...) → a JSON list of {"url", "caption", "similarity", "id"}, best
  first, or {"error": ...}. Answers come from `table` ({text: [(image name, similarity)]}) when the text
  is in it, else are drawn deterministically from the text: `num_images` names out of `n_urls` (so
  concepts share URLs) with decreasing similarities.
- GET /img/<name> is the web: a tiny JPEG for any name, except names that misbehave by prefix:
  missing- (404), slow- (answers after `slow_s`), trunc- (Content-Length promises more than is sent),
  huge- (a 300×300 PNG), text- (200 with a text body), optout- (X-Robots-Tag: noai), flaky- (500 once).

`python tests/knn_standin.py --port-file F` serves both until killed (benchmarks/retrieve_scale.py).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image


def image_bytes(name: str, size: int = 8, fmt: str = "JPEG") -> bytes:
    h = hashlib.sha1(name.encode()).digest()
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (h[0], h[1], h[2])).save(buf, format=fmt)
    return buf.getvalue()


class Standin:
    def __init__(self, n_urls: int = 1000, slow_s: float = 3.0, query_delay_s: float = 0.0,
                 image_size: int = 8):
        self.table: dict[str, list[tuple[str, float]]] = {}
        self.n_urls, self.slow_s, self.query_delay_s, self.image_size = n_urls, slow_s, query_delay_s, image_size
        self.queries: list[dict] = []
        self.gets: Counter = Counter()
        self.in_flight = self.max_in_flight = 0
        self.fail_queries = 0
        self._lock = threading.Lock()
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/json", headers=(),
                      length: int | None = None):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):   # the client gave up (timeout)
                    self.close_connection = True

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with srv._lock:
                    srv.queries.append(body)
                    srv.in_flight += 1
                    srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
                    fail = srv.fail_queries > 0
                    srv.fail_queries -= fail
                try:
                    if srv.query_delay_s:
                        time.sleep(srv.query_delay_s)
                    if self.path != "/knn-service":
                        return self._send(404, b"{}")
                    if fail:
                        return self._send(503, b"busy", "text/plain")
                    self._send(200, json.dumps(srv.answer(body)).encode())
                finally:
                    with srv._lock:
                        srv.in_flight -= 1

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                with srv._lock:
                    srv.gets[name] += 1
                    n = srv.gets[name]
                kind = name.split("-", 1)[0] if "-" in name else ""
                if kind == "missing":
                    return self._send(404, b"nope", "text/plain")
                if kind == "flaky" and n == 1:
                    return self._send(500, b"oops", "text/plain")
                if kind == "slow":
                    time.sleep(srv.slow_s)
                if kind == "text":
                    return self._send(200, b"<html>this is not an image</html>", "text/html")
                if kind == "huge":
                    return self._send(200, image_bytes(name, 300, "PNG"), "image/png")
                data = image_bytes(name, srv.image_size)
                if kind == "trunc":
                    self.close_connection = True
                    return self._send(200, data[: len(data) // 2], "image/jpeg", length=len(data))
                headers = [("X-Robots-Tag", "noai")] if kind == "optout" else []
                self._send(200, data, "image/jpeg", headers)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.url = self.base + "/knn-service"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, body: dict) -> list[dict] | dict:
        text = body["text"] if body.get("text") is not None else "embedding:" + json.dumps(body["embedding_input"])
        if text == "error please":
            return {"error": "indice not found"}
        k = int(body["num_images"])
        if text in self.table:
            rows = self.table[text][:k]
        else:
            seed = int(hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:12], 16)
            rows = [(f"u{(seed + i * 7919) % self.n_urls}.jpg", round(0.4 - i * 1e-4, 6)) for i in range(k)]
        out = [{"url": f"{self.base}/img/{name}", "caption": f"a caption of {name}", "similarity": s,
                "id": int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)}
               for name, s in rows]
        out.append({"caption": "an entry without url", "similarity": 0.01, "id": 1})   # skipped by clients
        return out

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port-file", required=True, help="written with the base URL once serving")
    ap.add_argument("--n-urls", type=int, default=1_000_000)
    ap.add_argument("--image-size", type=int, default=8)
    args = ap.parse_args()
    s = Standin(n_urls=args.n_urls, image_size=args.image_size)
    Path(args.port_file).write_text(s.base)
    try:
        s.thread.join()
    except KeyboardInterrupt:
        s.close()


if __name__ == "__main__":
    main()
