"""pas.models.diffusion: tiny SD folder (reproducible, real loaders), tokenizer, hub resolution."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pas.models import diffusion
from pas.models.diffusion import (build_tiny_sd, check_sd_dir, download_sd, load_pipeline, sd_files,
                                  write_clip_tokenizer)


def files_of(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "a", seed=0)


def test_same_seed_same_bytes(tiny, tmp_path):
    again = files_of(build_tiny_sd(tmp_path / "b", seed=0))
    assert again == files_of(tiny)
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors", "tokenizer/vocab.json", "scheduler/scheduler_config.json"} <= set(again)
    assert not any(k.startswith(("safety_checker", "feature_extractor")) for k in again)
    other = files_of(build_tiny_sd(tmp_path / "c", seed=1))
    assert other["unet/diffusion_pytorch_model.safetensors"] != again["unet/diffusion_pytorch_model.safetensors"]
    assert other["tokenizer/vocab.json"] == again["tokenizer/vocab.json"]


@pytest.mark.parametrize("text", ["a photo of apple pie.", "Crème brûlée, 2 spoons!", "🍕 pizza 🍣",
                                  "don't   STOP  believing", "x" * 300])
def test_tokenizer_matches_open_clip(tmp_path_factory, text):
    """The offline-built CLIPTokenizer gives the same ids as open_clip's own BPE tokenizer."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    d = tmp_path_factory.getbasetemp() / "tok"
    if not (d / "vocab.json").is_file():
        write_clip_tokenizer(d)
    hf = CLIPTokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"))
    ref = SimpleTokenizer()
    ids = hf(text).input_ids
    assert ids[0] == 49406 and ids[-1] == 49407
    assert ids[1:-1] == ref.encode(text)


def test_load_pipeline_and_scheduler(tiny):
    import torch

    pipe = load_pipeline(tiny, "cpu", "float32")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.safety_checker is None
    assert pipe.unet.dtype == torch.float32 and pipe.vae.config.block_out_channels == [16, 32, 32, 32]
    assert sum(p.numel() for p in pipe.unet.parameters()) < 1_500_000
    swapped = load_pipeline(tiny, "cpu", "float32", scheduler="euler")
    assert type(swapped.scheduler).__name__ == "EulerDiscreteScheduler"
    assert swapped.scheduler.config.beta_schedule == "scaled_linear"    # trained schedule kept
    img = pipe("a photo of tea", num_inference_steps=2, guidance_scale=2.0, height=64, width=64,
               generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (64, 64)
    with pytest.raises(ValueError, match="scheduler"):
        load_pipeline(tiny, scheduler="warp")
    with pytest.raises(ValueError, match="dtype"):
        load_pipeline(tiny, dtype="int8")


def test_missing_folder_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro models"):
        load_pipeline(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="unet/config.json"):
        (tmp_path / "model_index.json").write_text("{}")
        check_sd_dir(tmp_path)


def test_sd_files_resolution():
    plain = sd_files()
    assert "unet/diffusion_pytorch_model.safetensors" in plain and "text_encoder/model.safetensors" in plain
    assert not any("safety_checker" in f or f.endswith(".bin") for f in plain)
    fp16 = sd_files("fp16")
    assert "vae/diffusion_pytorch_model.fp16.safetensors" in fp16
    assert "vae/diffusion_pytorch_model.safetensors" not in fp16
    assert set(diffusion.REQUIRED) <= set(plain)


def test_download_sd_requests_the_right_files(tmp_path, monkeypatch):
    """download_sd asks the hub for exactly the files load_pipeline needs (hub mocked: no network)."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, *, revision=None, local_dir=None, allow_patterns=None, token=None, **kw):
        calls.append({"repo_id": repo_id, "revision": revision, "allow_patterns": list(allow_patterns)})
        for rel in allow_patterns:
            p = Path(local_dir) / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("{}")
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = download_sd("stabilityai/stable-diffusion-2-1", tmp_path / "sd21", revision="abc123", variant="fp16")
    assert calls == [{"repo_id": "stabilityai/stable-diffusion-2-1", "revision": "abc123",
                      "allow_patterns": sd_files("fp16")}]
    src = json.loads((out / "pas_model.json").read_text())
    assert src == {"kind": "pretrained", "repo_id": "stabilityai/stable-diffusion-2-1", "revision": "abc123",
                   "variant": "fp16"}
    assert diffusion._variant(out) == "fp16"

    def incomplete(repo_id, *, local_dir=None, **kw):
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / "model_index.json").write_text("{}")
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", incomplete)
    with pytest.raises(FileNotFoundError, match="missing unet/config.json"):
        download_sd("org/not-sd", tmp_path / "bad")


def test_fingerprint_tracks_weights(tiny, tmp_path):
    fp = diffusion.fingerprint(tiny)
    assert fp == diffusion.fingerprint(tiny) and len(fp) == 64
    assert diffusion.fingerprint(build_tiny_sd(tmp_path / "s1", seed=1)) != fp
