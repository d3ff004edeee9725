"""Check one container family's software stack: imports, CUDA, and a tiny forward pass per library.

Run by each image's `%test` (`python3 /opt/pas/check_stack.py <family> --device cuda`), by hand on a
GPU node (`apptainer test --nv containers/vision.sif`, or natively `python containers/check_stack.py
vision`), and by the offline tests on CPU (`--device cpu`, which skips the CUDA-only parts: vLLM and
faiss GPU indexes). No weights are downloaded: every model is a tiny seeded random-init instance of the
real architecture, so a pass means "the stack imports and runs kernels on this device", nothing more.

Exit status 0 and one `ok` line per check; the first failure raises with the library named.
Standard library only at module level: the families' libraries are imported inside their checks.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# modules every family must import (the stage scripts' common needs), then each family's stack
COMMON = ["numpy", "pandas", "pyarrow", "yaml", "PIL", "tqdm", "webdataset", "requests",
          "huggingface_hub", "pas", "pas.params", "pas.io.shards", "pas.io.manifest"]
STACKS = {
    "llm": ["vllm", "transformers", "accelerate", "gguf", "sentence_transformers", "pas.llm"],
    "diffusion": ["diffusers", "transformers", "accelerate", "safetensors", "open_clip"],
    "vision": ["torchvision", "open_clip", "faiss", "timm", "lightly", "rapidocr_onnxruntime",
               "safetensors", "dvclive", "img2dataset"],
}
CUDA_ONLY = {"vllm"}   # vLLM has no CPU build in these images: imported only with --device cuda


def _ok(what: str, t0: float) -> None:
    print(f"ok {what} ({time.perf_counter() - t0:.2f}s)", flush=True)


def check_imports(family: str, device: str) -> None:
    import importlib

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")   # img2dataset's albumentations asks PyPI otherwise

    for name in COMMON + STACKS[family]:
        if name in CUDA_ONLY and device != "cuda":
            print(f"skip {name} (CUDA only)", flush=True)
            continue
        t0 = time.perf_counter()
        mod = importlib.import_module(name)
        _ok(f"import {name} {getattr(mod, '__version__', '')}".rstrip(), t0)


def check_torch(device: str):
    import torch

    t0 = time.perf_counter()
    if device == "cuda":
        assert torch.cuda.is_available(), "torch sees no CUDA device (GPU node? apptainer --nv?)"
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(64, 64, generator=g)
    got = (a.to(device) @ a.to(device)).cpu()
    assert torch.allclose(got, a @ a, atol=1e-3), "matmul on the device differs from the CPU result"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    _ok(f"torch {torch.__version__} matmul on {name} (cuda {torch.version.cuda})", t0)
    return torch


def check_llm(device: str) -> None:
    torch = check_torch(device)
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).to(device).eval()
    ids = torch.tensor([[1, 5, 9, 17]], device=device)
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8), out.shape
    _ok("transformers tiny Llama greedy generate", t0)
    if device == "cuda":
        import vllm

        t0 = time.perf_counter()
        from vllm import SamplingParams

        assert SamplingParams(max_tokens=4, temperature=0.0).max_tokens == 4
        _ok(f"vllm {vllm.__version__} SamplingParams", t0)


def check_diffusion(device: str) -> None:
    torch = check_torch(device)
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    t0 = time.perf_counter()
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        max_position_embeddings=16, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1)).to(device).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=32, attention_head_dim=8,
                                norm_num_groups=8).to(device).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8).to(device).eval()
    sched = DDIMScheduler(num_train_timesteps=100)
    sched.set_timesteps(2)
    with torch.no_grad():
        cond = text(torch.tensor([[0, 5, 7, 1]], device=device)).last_hidden_state   # (1, 4, 32)
        lat = torch.randn(1, 4, 8, 8, device=device)
        for t in sched.timesteps:
            lat = sched.step(unet(lat, t, encoder_hidden_states=cond).sample, t, lat).prev_sample
        img = vae.decode(lat).sample                                                  # (1, 3, 16, 16)
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all(), img.shape
    _ok("diffusers tiny UNet + VAE, 2 DDIM steps", t0)


def check_vision(device: str) -> None:
    torch = check_torch(device)
    import numpy as np

    import faiss
    import open_clip
    import timm
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead

    t0 = time.perf_counter()
    torch.manual_seed(0)
    clip = open_clip.CLIP(embed_dim=32,
                          vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=32, head_width=16,
                                                             patch_size=8, image_size=32),
                          text_cfg=open_clip.CLIPTextCfg(context_length=16, vocab_size=100, width=32,
                                                         heads=2, layers=1)).to(device).eval()
    with torch.no_grad():
        f_img = clip.encode_image(torch.randn(2, 3, 32, 32, device=device), normalize=True)
        f_txt = clip.encode_text(torch.randint(0, 100, (3, 16), device=device), normalize=True)
    assert f_img.shape == (2, 32) and f_txt.shape == (3, 32)
    _ok("open_clip tiny CLIP encode_image/encode_text", t0)

    t0 = time.perf_counter()
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0)
    net = net.to(device)
    head = MoCoProjectionHead(net.num_features, 64, 16, num_layers=3, batch_norm=True).to(device)
    z0 = head(net(torch.randn(4, 3, 32, 32, device=device)))
    z1 = head(net(torch.randn(4, 3, 32, 32, device=device)))
    loss = NTXentLoss(memory_bank_size=0)(z0, z1)
    loss.backward()
    assert torch.isfinite(loss), loss
    _ok("timm vit_tiny + lightly MoCo head, NT-Xent backward", t0)

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((200, 16)).astype("float32")
    xq = xb[:5] + 0.01 * rng.standard_normal((5, 16)).astype("float32")
    if device == "cuda":
        assert faiss.get_num_gpus() > 0, "faiss sees no GPU (faiss-gpu wheel? --nv?)"
        index = faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), 16)
    else:
        index = faiss.IndexFlatL2(16)
    index.add(xb)
    _, nn = index.search(xq, 1)
    brute = ((xq[:, None, :] - xb[None, :, :]) ** 2).sum(-1).argmin(1)
    assert (nn[:, 0] == brute).all(), (nn[:, 0], brute)
    _ok(f"faiss {faiss.__version__} {'GPU' if device == 'cuda' else 'CPU'} flat search == brute force", t0)


CHECKS = {"llm": check_llm, "diffusion": check_diffusion, "vision": check_vision}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("family", choices=sorted(CHECKS))
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cuda (default; what %%test runs) or cpu (offline tests; skips CUDA-only parts)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    check_imports(args.family, args.device)
    CHECKS[args.family](args.device)
    print(f"{args.family} stack ok on {args.device} in {time.perf_counter() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
