"""Session fixtures shared by the tests that use the stand-ins: the tiny Hub repositories, built once.
Also `file_server`, a plain HTTP server of files on 127.0.0.1 (the release hosts of URL weights).
Import them into a test module (`from tests.standins.fixtures import standin_repos`)."""

from __future__ import annotations

import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.standins.repos import llm_corpus, write_llm_repo, write_minilm_repo, write_sd_repo


@pytest.fixture(scope="session")
def llm_repos(tmp_path_factory):
    """{"mixtral", "llama2"}: tiny Mixtral-8x7B-Instruct / Llama-2-13b-chat repositories (< 1 s)."""
    root = tmp_path_factory.mktemp("llm-repos")
    corpus = llm_corpus()
    return {"mixtral": write_llm_repo(root / "mixtral", "mixtral", corpus),
            "llama2": write_llm_repo(root / "llama2", "llama2", corpus)}


@pytest.fixture(scope="session")
def standin_repos(tmp_path_factory, llm_repos):
    """llm_repos + {"sd": an SD 2.1-style diffusers repo, "minilm": all-MiniLM-L6-v2}."""
    root = tmp_path_factory.mktemp("hub-repos")
    return {**llm_repos, "sd": write_sd_repo(root / "sd"), "minilm": write_minilm_repo(root / "minilm")}


@pytest.fixture
def file_server(tmp_path):
    """A plain HTTP file server of `root` (the role of the SSCD and CLIPN weight hosts): (root, base URL)."""
    root = tmp_path / "files"
    root.mkdir()

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
