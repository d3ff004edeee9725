"""The leaf modules pas.hashing and pas.jsonio: each writer and fingerprint keeps the bytes the code
wrote before them (resume files and DVC-tracked JSON stay valid), checked against the json.dumps
forms they replaced."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import PurePosixPath

import pytest

from pas.hashing import sha256_bytes, sha256_file, sha256_json
from pas.jsonio import write_atomic, write_json

VALUE = {"b": [1, 2.5, None], "a": {"z": "pâté", "y": True}, "fingerprint": "ab" * 32}


@pytest.mark.parametrize("size", [0, 1, 4096, 10_001])
def test_sha256_file_reads_in_chunks_to_the_whole_file_digest(tmp_path, size):
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk=1000) == hashlib.sha256(data).hexdigest()


def test_sha256_bytes_text_is_utf8_and_a_lone_surrogate_still_hashes():
    assert sha256_bytes("pâté") == hashlib.sha256("pâté".encode()).hexdigest() == sha256_bytes("pâté".encode())
    assert sha256_bytes("a\ud800") == hashlib.sha256(b"a\xed\xa0\x80").hexdigest()


def test_sha256_json_ignores_key_order_and_matches_the_dumps_it_replaced():
    assert sha256_json({"x": 1, "y": 2}) == sha256_json({"y": 2, "x": 1})
    # ood / knn_service / llm answer keys: ensure_ascii=False
    assert sha256_json(VALUE) == hashlib.sha256(
        json.dumps(VALUE, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    # generate's run fingerprint, WorkStore names, the LLM spec fingerprint: json.dumps defaults (ASCII)
    assert sha256_json(VALUE, ensure_ascii=True) == hashlib.sha256(json.dumps(VALUE, sort_keys=True).encode()).hexdigest()
    assert sha256_json(VALUE, ensure_ascii=False) != sha256_json(VALUE, ensure_ascii=True)
    odd = {"p": PurePosixPath("/x/y")}       # default=str: the LLM spec and WorkStore ids
    assert sha256_json(odd, ensure_ascii=True, default=str) == hashlib.sha256(
        json.dumps(odd, sort_keys=True, default=str).encode()).hexdigest()


@pytest.mark.parametrize("kw,want", [
    ({}, json.dumps(VALUE, indent=2, sort_keys=True) + "\n"),                       # metrics, model configs
    ({"ensure_ascii": False}, json.dumps(VALUE, indent=2, sort_keys=True, ensure_ascii=False) + "\n"),
    ({"indent": 1}, json.dumps(VALUE, indent=1, sort_keys=True) + "\n"),            # evalsets classes.json
    ({"indent": None, "atomic": True}, json.dumps(VALUE, sort_keys=True) + "\n"),   # WorkStore markers
    ({"indent": None, "newline": False, "atomic": True}, json.dumps(VALUE, sort_keys=True)),   # knn download.json
])
def test_write_json_bytes_are_those_of_the_writer_it_replaced(tmp_path, kw, want):
    path = write_json(tmp_path / "sub" / "x.json", VALUE, **kw)
    assert path.read_bytes() == want.encode()
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]          # no temp file left


def test_write_atomic_replaces_whole_and_leaves_no_temp(tmp_path):
    p = tmp_path / "m.json"
    p.write_text("old")
    write_atomic(p, "new ü")
    assert p.read_bytes() == "new ü".encode() and [f.name for f in tmp_path.iterdir()] == ["m.json"]
    write_atomic(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
