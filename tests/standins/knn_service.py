"""A stand-in for a clip-retrieval kNN service over LAION (the back-end HTTP API of clip-retrieval 2.45,
`clip_retrieval/clip_back.py`): `POST /knn-service` with {"text" | "image" | "embedding_input",
"modality", "num_images", "indice_name", ...} answers a JSON list of {"url", "caption", "similarity",
"id"}, best first; the URLs point at `GET /img/<name>` on the same server, as LAION's point at the web.
It searches a fixed set of images by their captions (words shared with the query, ties by a digest),
not by CLIP embeddings: it stands in for the service's API, not for its index. Every query is logged in
`requests`, every image fetch counted in `hits`."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class KnnService:
    def __init__(self, images: dict[str, tuple[bytes, str]], indice_name: str = "laion5B-L-14") -> None:
        """images: {file name: (JPEG bytes, caption)}."""
        self.images, self.indice_name = images, indice_name
        self.requests: list[dict] = []
        self.hits: dict[str, int] = {}
        self._lock = threading.Lock()
        svc = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with svc._lock:
                    svc.requests.append(body)
                if self.path != "/knn-service":
                    return self._send(404, b"{}")
                if body.get("indice_name") != svc.indice_name:
                    return self._send(200, json.dumps({"error": f"indice {body.get('indice_name')} not found"}).encode())
                self._send(200, json.dumps(svc.search(body.get("text") or "", int(body.get("num_images", 40)))).encode())

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                if not self.path.startswith("/img/") or name not in svc.images:
                    return self._send(404, b"not found", "text/plain")
                with svc._lock:
                    svc.hits[name] = svc.hits.get(name, 0) + 1
                self._send(200, svc.images[name][0], "image/jpeg")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def search(self, text: str, k: int) -> list[dict]:
        words = set(re.findall(r"[a-z]+", text.lower())) - {"a", "of", "photo", "the"}

        def rank(name: str):
            shared = len(words & set(self.images[name][1].lower().split()))
            return (-shared, hashlib.sha256(f"{text}|{name}".encode()).hexdigest())

        names = sorted(self.images, key=rank)[:k]
        return [{"url": f"{self.url}/img/{n}", "caption": self.images[n][1], "similarity": round(0.4 - 0.01 * i, 4),
                 "id": int(hashlib.sha256(n.encode()).hexdigest()[:8], 16)} for i, n in enumerate(names)]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
