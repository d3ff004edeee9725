"""pas.models.diffusion: tiny SD folder (reproducible, real loaders), tokenizer, the files a hub download
takes (the download itself: tests/test_hub.py), dtype and VAE memory options."""

from __future__ import annotations

import pytest

from pas.models import diffusion
from pas.models.diffusion import (build_tiny_sd, check_sd_dir, load_pipeline, resolve_dtype, sd_files,
                                  write_clip_tokenizer)
from tests.helpers import file_digests


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "a", seed=0)


def test_same_seed_same_bytes(tiny, tmp_path):
    again = file_digests(build_tiny_sd(tmp_path / "b", seed=0))
    assert again == file_digests(tiny)
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors", "tokenizer/vocab.json", "scheduler/scheduler_config.json"} <= set(again)
    assert not any(k.startswith(("safety_checker", "feature_extractor")) for k in again)
    other = file_digests(build_tiny_sd(tmp_path / "c", seed=1))
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


def test_dtype_auto_is_fp16_on_cuda_only():
    assert resolve_dtype("auto", "cuda") == resolve_dtype("auto", "cuda:1") == "float16"
    assert resolve_dtype("auto", "cpu") == "float32" and resolve_dtype("bfloat16", "cuda") == "bfloat16"
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("fp8", "cuda")


def test_vae_slicing_and_tiling_by_param(tiny):
    """VAE slicing decodes a batch one image at a time: the same images up to float rounding (a batch of
    one and a batch of two take other kernel paths: ±1 grey level with one torch thread, measured);
    tiling is switched on for the VAE (it only tiles images larger than its sample size)."""
    import numpy as np
    import torch

    from pas.collect.generate import DiffusionParams, generate_images
    from pas.params import ParamsError, build

    d = DiffusionParams(steps=2, resolution=64)
    assert d.dtype == "auto" and not d.vae_slicing and not d.vae_tiling
    plain = load_pipeline(tiny, "cpu", d.dtype)
    sliced = load_pipeline(tiny, "cpu", "auto", vae_slicing=True, vae_tiling=True)
    assert plain.unet.dtype == torch.float32 and not plain.vae.use_slicing
    assert sliced.vae.use_slicing and sliced.vae.use_tiling
    a = generate_images(plain, ["tea", "rice"], [1, 2], d)
    b = generate_images(sliced, ["tea", "rice"], [1, 2], d)
    assert all(np.abs(np.asarray(x).astype(int) - np.asarray(y).astype(int)).max() <= 1 for x, y in zip(a, b))
    with pytest.raises(ParamsError, match="diffusion.vae_slicing"):
        build(DiffusionParams, {"diffusion": {"vae_slicing": "yes"}}, "diffusion")


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


def test_fingerprint_tracks_weights(tiny, tmp_path):
    fp = diffusion.fingerprint(tiny)
    assert fp == diffusion.fingerprint(tiny) and len(fp) == 64
    assert diffusion.fingerprint(build_tiny_sd(tmp_path / "s1", seed=1)) != fp
