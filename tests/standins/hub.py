"""A loopback Hugging Face Hub: an HTTP server on 127.0.0.1 that the real `huggingface_hub` client
(installed: 2.4.0) talks to through `HF_ENDPOINT=http://127.0.0.1:<port>`.

It implements the endpoints that `snapshot_download`, `hf_hub_download`, `HfApi.model_info` and
`HfApi.auth_check` call, with the Hub's status codes and headers (as read in huggingface_hub 2.4.0's
`_snapshot_download.py`, `file_download.py`, `hf_api.py` and `utils/_http.py:hf_raise_for_status`):

- `GET /api/models/<repo>[/revision/<rev>]` — model info: `sha`, `siblings`, `gated`, ...;
- `GET /api/models/<repo>/auth-check` — 200 when the token may read the repo;
- `GET /api/models/<repo>/tree/<rev>[/<path>]?recursive=...` — the file list (`oid`, `size`, `lfs`);
- `HEAD|GET /<repo>/resolve/<rev>/<path>` — `X-Repo-Commit`, `ETag` (git blob sha1) for small files;
  weight files are LFS: a 302 to `<cdn>/cdn/<sha256>` with `X-Linked-Etag` (sha256) and `X-Linked-Size`,
  as the Hub redirects LFS files to its CDN (another origin: a second port, so the client takes the
  file's metadata from the redirect itself and drops the token, as with the real CDN); the CDN serves
  the bytes (Range supported).

Errors as the Hub sends them (`X-Error-Code` / `X-Error-Message`, which huggingface_hub maps to its
exception classes): a missing repository is 401 without a token and 404 with one, `RepoNotFound`
(RepositoryNotFoundError); a gated repository answers its files and auth-check with 401 `GatedRepo`
without a token and 403 `GatedRepo` with a valid token of an account that has not accepted the
licence (GatedRepoError), while its model info and file list stay public, as on the Hub; an unknown
token is 401 "Invalid credentials in Authorization header"; an unknown revision is 404
`RevisionNotFound`, an unknown file 404 `EntryNotFound`. No Xet headers are sent, so the client uses
plain HTTP downloads. Every request is logged in `hub.requests` as (method, path, token).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".msgpack", ".h5")
INVALID_TOKEN = "Invalid credentials in Authorization header"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    path: str          # path in the repo
    disk: Path         # where its bytes are
    size: int
    oid: str           # git blob sha1 (of the LFS pointer for LFS files, as on the Hub)
    sha256: str | None  # LFS files only


@dataclass
class Repo:
    repo_id: str
    sha: str
    files: dict[str, StoredFile]
    gated: bool = False
    allowed: set[str] = field(default_factory=set)   # tokens that accepted the licence


def _file(path: str, disk: Path) -> StoredFile:
    data = disk.read_bytes()
    if path.endswith(LFS_SUFFIXES):
        sha = hashlib.sha256(data).hexdigest()
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n"
        return StoredFile(path, disk, len(data), git_blob_sha1(pointer.encode()), sha)
    return StoredFile(path, disk, len(data), git_blob_sha1(data), None)


class HubStandIn:
    """`with HubStandIn() as hub: hub.add_repo(...); os.environ["HF_ENDPOINT"] = hub.url`."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.tokens: set[str] = set()          # valid tokens (any account)
        self.requests: list[tuple[str, str, str | None]] = []
        self._blobs: dict[str, StoredFile] = {}
        self._lock = threading.Lock()
        hub = self

        def handler(cdn: bool):
            class Handler(BaseHTTPRequestHandler):
                protocol_version = "HTTP/1.1"

                def log_message(self, *args):
                    pass

                def do_HEAD(self):
                    hub._serve(self, head=True, cdn=cdn)

                def do_GET(self):
                    hub._serve(self, head=False, cdn=cdn)
            return Handler

        self.servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler(cdn)) for cdn in (False, True)]
        for s in self.servers:
            s.daemon_threads = True
        self.url, self.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in self.servers)
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in self.servers]

    # ------------------------------------------------------------------ set-up

    def add_repo(self, repo_id: str, folder: str | Path, sha: str | None = None, gated: bool = False,
                 allowed_tokens: tuple[str, ...] = ()) -> Repo:
        """Serve every file under `folder` as `repo_id` at commit `sha` (default: a digest of the files)."""
        folder = Path(folder)
        files = {}
        for p in sorted(x for x in folder.rglob("*") if x.is_file()):
            rel = p.relative_to(folder).as_posix()
            files[rel] = _file(rel, p)
        if sha is None:
            sha = hashlib.sha1(json.dumps({k: f.oid for k, f in files.items()}).encode()).hexdigest()
        repo = Repo(repo_id, sha, files, gated, set(allowed_tokens))
        self.tokens |= set(allowed_tokens)
        with self._lock:
            self.repos[repo_id] = repo
            for f in files.values():
                if f.sha256:
                    self._blobs[f.sha256] = f
        return repo

    def add_token(self, token: str) -> None:
        """A valid token of an account that accepted no licence."""
        self.tokens.add(token)

    def file_requests(self, repo_id: str | None = None) -> list[str]:
        """Paths of the files whose bytes were requested (resolve GETs and CDN GETs)."""
        out = []
        for method, path, _ in self.requests:
            if method != "GET":
                continue
            if "/resolve/" in path and (repo_id is None or path.startswith(f"/{repo_id}/resolve/")):
                out.append(path)
            elif path.startswith("/cdn/") and repo_id is None:
                out.append(path)
        return out

    def env(self, hf_home: str | Path) -> dict[str, str]:
        """Environment for a process whose huggingface_hub should use this Hub (set before it imports)."""
        return {"HF_ENDPOINT": self.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(hf_home),
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}

    def use_in_process(self, monkeypatch, hf_home: str | Path) -> None:
        """Point this process's (already imported) huggingface_hub at this Hub: its constants are read
        at import time, so they are patched too; no token unless a test sets HF_TOKEN."""
        from huggingface_hub import constants

        hf_home = Path(hf_home)
        for k, v in self.env(hf_home).items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(constants, "ENDPOINT", self.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", self.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        for s in self.servers:
            s.shutdown()
            s.server_close()

    # ------------------------------------------------------------------ HTTP

    def _serve(self, h: BaseHTTPRequestHandler, head: bool, cdn: bool) -> None:
        url = urlsplit(h.path)
        path = unquote(url.path)
        auth = h.headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        with self._lock:
            self.requests.append(("HEAD" if head else "GET", path, token))
        if cdn:      # signed URLs on the real CDN: no token needed (and none is sent)
            blob = self._blobs.get(path[len("/cdn/"):]) if path.startswith("/cdn/") else None
            if blob is None:
                return self._error(h, 404, None, "Not found", head)
            return self._send_file(h, blob, head, {})
        if token is not None and token not in self.tokens:
            return self._error(h, 401, None, INVALID_TOKEN, head)
        if path.startswith("/api/models/"):
            return self._api(h, path[len("/api/models/"):], parse_qs(url.query), token, head)
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m:
            return self._resolve(h, m.group(1), m.group(2), m.group(3), token, head)
        return self._error(h, 404, None, "Not found", head)

    def _repo(self, h, repo_id: str, token: str | None, head: bool) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:   # the Hub does not tell a missing repo from a private one without a token
            self._error(h, 401 if token is None else 404, "RepoNotFound", "Repository not found", head)
        return repo

    def _may_read(self, h, repo: Repo, token: str | None, head: bool) -> bool:
        if not repo.gated or token in repo.allowed:
            return True
        if token is None:
            self._error(h, 401, "GatedRepo", f"Access to model {repo.repo_id} is restricted. You must have "
                        "access to it and be authenticated to access it. Please log in.", head)
        else:
            self._error(h, 403, "GatedRepo", f"Access to model {repo.repo_id} is restricted and you are not "
                        f"in the authorized list. Visit {self.url}/{repo.repo_id} to ask for access.", head)
        return False

    def _revision(self, h, repo: Repo, rev: str, head: bool) -> bool:
        if rev in ("main", repo.sha):
            return True
        self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        return False

    def _api(self, h, rest: str, query: dict, token: str | None, head: bool) -> None:
        m = re.match(r"^([^/]+/[^/]+)(?:/(auth-check|revision/([^/]+)|tree/([^/]+)(?:/(.*))?))?$", rest)
        if not m:
            return self._error(h, 404, None, "Not found", head)
        repo = self._repo(h, m.group(1), token, head)
        if repo is None:
            return
        if m.group(2) == "auth-check":
            if self._may_read(h, repo, token, head):
                self._json(h, {}, head)
            return
        if m.group(4) is not None:                                    # tree
            if not self._revision(h, repo, m.group(4), head):
                return
            prefix = (m.group(5) or "").strip("/")
            recursive = query.get("recursive", ["False"])[0].lower() == "true"
            return self._json(h, self._tree(repo, prefix, recursive), head)
        rev = m.group(3) or "main"                                    # model info
        if not self._revision(h, repo, rev, head):
            return
        self._json(h, {"_id": repo.sha[:24], "id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.sha,
                       "private": False, "disabled": False, "gated": "manual" if repo.gated else False,
                       "downloads": 0, "likes": 0, "tags": [],
                       "siblings": [{"rfilename": p} for p in repo.files]}, head)

    def _tree(self, repo: Repo, prefix: str, recursive: bool) -> list[dict]:
        out, folders = [], set()
        for path, f in repo.files.items():
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1:] if prefix else path
            parts = rest.split("/")
            for i in range(1, len(parts)):                           # the folders on the way
                folder = "/".join(([prefix] if prefix else []) + parts[:i])
                if (recursive or i == 1) and folder not in folders:
                    folders.add(folder)
                    out.append({"type": "directory", "oid": git_blob_sha1(folder.encode()), "size": 0,
                                "path": folder})
            if not recursive and len(parts) > 1:
                continue
            entry = {"type": "file", "oid": f.oid, "size": f.size, "path": path}
            if f.sha256:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            out.append(entry)
        return out

    def _resolve(self, h, repo_id: str, rev: str, filename: str, token: str | None, head: bool) -> None:
        repo = self._repo(h, repo_id, token, head)
        if repo is None or not self._may_read(h, repo, token, head) or not self._revision(h, repo, rev, head):
            return
        f = repo.files.get(filename)
        if f is None:
            return self._error(h, 404, "EntryNotFound", f"{filename} does not exist on \"{rev}\"", head,
                               {"X-Repo-Commit": repo.sha})
        common = {"X-Repo-Commit": repo.sha}
        if f.sha256:            # LFS: the Hub redirects to its CDN, naming the blob in X-Linked-*
            h.send_response(302)
            for k, v in {**common, "Location": f"{self.cdn_url}/cdn/{f.sha256}", "ETag": f'"{f.oid}"',
                         "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size),
                         "Content-Length": "0"}.items():
                h.send_header(k, v)
            h.end_headers()
            return
        self._send_file(h, f, head, {**common, "ETag": f'"{f.oid}"'})

    # ------------------------------------------------------------------ responses

    def _send_file(self, h, f: StoredFile, head: bool, headers: dict) -> None:
        data = f.disk.read_bytes()
        start, code = 0, 200
        rng = h.headers.get("Range")
        if rng and not head:
            m = re.match(r"bytes=(\d+)-", rng)
            if m:
                start, code = int(m.group(1)), 206
        body = data[start:]
        h.send_response(code)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(body)))
        if code == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _json(self, h, obj, head: bool) -> None:
        body = json.dumps(obj).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _error(self, h, code: int, error_code: str | None, message: str, head: bool,
               extra: dict | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        h.send_response(code)
        if error_code:
            h.send_header("X-Error-Code", error_code)
        h.send_header("X-Error-Message", message)
        for k, v in (extra or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)
