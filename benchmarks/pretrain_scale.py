"""Pretraining at scale, measured on CPU: activation memory per image, images/s with 1 vs 2 processes, and the
per-GPU micro-batch that follows for the paper's backbones. Writes benchmarks/results-pretrain-scale.json.

    PYTHONPATH=src python benchmarks/pretrain_scale.py            # all (≈ 3 min on 2 cores)
    PYTHONPATH=src python benchmarks/pretrain_scale.py memory     # only the activation memory part

Activation memory = the bytes autograd keeps for the backward pass of one step's gradient-carrying forward
(both views through the online network: backbone + heads), counted with torch.autograd.graph.saved_tensors_hooks
over distinct storages that are not parameters, at two micro-batch sizes: per image = the slope, so constants
(autocast's bf16 weight copies) drop out. It is what grows with the micro-batch; a GPU also holds the weights,
gradients, AdamW moments and momentum encoder (counted from the parameter numbers), a CUDA context and
allocator slack (a margin, stated in the output). timm's ViTs use fused attention (scaled_dot_product_attention),
which keeps no N×N attention matrix on CPU or GPU alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

GiB = 2**30
# (name, timm architecture, kwargs, image size, method, projector hidden, predictor hidden): the paper presets
BACKBONES = [
    ("smoke ViT-tiny/16 32 px (params.yaml)", "vit_tiny_patch16_224", {"img_size": 32}, 32, "mocov3", 1024, 1024),
    ("ViT-B/16 224 px, MoCo v3", "vit_base_patch16_224", {"img_size": 224}, 224, "mocov3", 4096, 4096),
    ("ResNet-50 224 px, NNCLR", "resnet50", {}, 224, "nnclr", 2048, 4096),
    ("ResNet-18 224 px, NNCLR", "resnet18", {}, 224, "nnclr", 2048, 4096),
]
CARDS = {"80 GB (A100/H100)": 80e9, "141 GB (H200)": 141e9}
RESERVED = 0.10     # of the card: CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation
TRANSIENT = 1.25    # peak / saved activations: backward's activation gradients and temporaries (assumed)


def _model(arch, kwargs, method, hidden, pred_hidden):
    import timm

    from pas.models.files import seed_everything
    from pas.train.ssl import build_model

    seed_everything(0)
    backbone = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    return build_model(method, backbone, hidden_dim=hidden, out_dim=256, pred_hidden_dim=pred_hidden,
                       temperature=0.2, memory_bank_size=98304)   # NNCLR's support set


def saved_bytes(model, batch: int, size: int, autocast: bool) -> int:
    """Bytes autograd saves for backward in the online forward of both views of `batch` images."""
    from pas.train.ssl import TwoViews

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    x0, x1 = torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        out = TwoViews(model)(x0, x1)
    del out
    return sum(seen.values())


def memory() -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for name, arch, kwargs, size, method, hidden, pred_hidden in BACKBONES:
        model = _model(arch, kwargs, method, hidden, pred_hidden).train()
        online = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        row = {"backbone": name, "trained_params": online, "frozen_params": frozen, "buffer_bytes": buffers}
        for autocast in (False, True):
            b = (2, 4)
            t0 = time.time()
            small, big = (saved_bytes(model, n, size, autocast) for n in b)
            key = "bf16" if autocast else "fp32"
            row[f"activation_gib_per_image_{key}"] = round((big - small) / (b[1] - b[0]) / GiB, 4)
            row[f"seconds_{key}"] = round(time.time() - t0, 1)
        # fp32 weights + grads + AdamW's two moments of what is trained; fp32 copy of the momentum encoder
        # and frozen weights; bf16 copies autocast makes of the weights; buffers (BN stats, NN support set)
        row["fixed_gib"] = round((16 * online + 4 * frozen + 2 * (online + frozen) + buffers) / GiB, 2)
        per_img = row["activation_gib_per_image_bf16"] * GiB * TRANSIENT
        row["micro_batch_bf16"] = {}
        for card, nbytes in CARDS.items():
            fit = int((nbytes * (1 - RESERVED) - row["fixed_gib"] * GiB) // per_img)
            row["micro_batch_bf16"][card] = {"fits": fit, "power_of_two": 2 ** (fit.bit_length() - 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def throughput(n_images: int = 384, epochs: int = 2, repeats: int = 3) -> list[dict]:
    """The smoke profile's pretrain (params.yaml: ViT-tiny 32 px, batch 32) on synthetic shards: 1 process,
    1 process accumulating 2 x 16, and 2 gloo processes x 16 under torchrun (the stage's own launch), each
    `repeats` times, interleaved (a shared machine's load moves between runs)."""
    import statistics

    import yaml

    from tests.train_helpers import synthetic_shards, tiny_backbone_init, write_params

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    layouts = (("1 process", {"devices": 1}),
               ("1 process, 2 x 16 accumulated", {"devices": 1, "micro_batch_size": 16}),
               ("2 processes (gloo) x 16", {"devices": 2}))
    runs: dict[str, list[dict]] = {label: [] for label, _ in layouts}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = synthetic_shards(tmp / "ds", n_images, maxcount=n_images // 4)   # 4 equal shards
        init = tiny_backbone_init(tmp / "init", params["models"]["backbone_init"])
        base = {**params["pretrain"], "epochs": epochs, "warmup_epochs": 0}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "TQDM_DISABLE": "1"}
        for r in range(repeats):
            for label, extra in layouts:
                d = tmp / f"{r}-{label.replace(' ', '_').replace(',', '')}"
                p = write_params(d.with_suffix(".yaml"), pretrain={**base, **extra},
                                 models={"backbone_init": params["models"]["backbone_init"]})
                cmd = [sys.executable, str(ROOT / "stages" / "pretrain.py"), "--data", str(data), "--init",
                       str(init), "--out", str(d / "out"), "--ckpt", str(d / "ckpt"), "--live", str(d / "live"),
                       "--params", str(p), "--metrics", str(d / "m.json")]
                load = os.getloadavg()[0]
                t0 = time.time()
                subprocess.run(cmd, env=env, check=True, capture_output=True)
                wall = time.time() - t0
                run = json.loads((d / "m.run.json").read_text())
                m = json.loads((d / "m.json").read_text())
                row = {"images": m["samples_seen"], "train_seconds": run["seconds"],
                       "images_per_s": round(m["samples_seen"] / run["seconds"], 1), "wall_seconds": round(wall, 1),
                       "load_before": round(load, 2), "loss_last_epoch": m["loss_last_epoch"]}
                runs[label].append(row)
                print(label, json.dumps(row), flush=True)
    return [{"run": label, "median_images_per_s": statistics.median(r["images_per_s"] for r in rows),
             "median_wall_seconds": statistics.median(r["wall_seconds"] for r in rows), "repeats": rows}
            for label, rows in runs.items()]


def main() -> None:
    what = sys.argv[1:] or ["memory", "throughput"]
    out = ROOT / "benchmarks" / "results-pretrain-scale.json"
    res = json.loads(out.read_text()) if out.is_file() else {}
    res["machine"] = {"cpus": os.cpu_count(), "torch": torch.__version__, "threads_per_process": 1}
    res["assumptions"] = {"reserved_fraction_of_card": RESERVED, "peak_over_saved_activations": TRANSIENT}
    if "memory" in what:
        res["memory"] = memory()
    if "throughput" in what:
        res["throughput"] = throughput()
    out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
