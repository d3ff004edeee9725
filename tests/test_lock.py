"""scripts/lock.py --cpu-torch: the lock CI installs with PyTorch's CPU wheels (install.sh, PAS_TORCH=cpu)."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import re

from tests.dvc_helpers import REPO

spec = importlib.util.spec_from_file_location("lock", REPO / "scripts/lock.py")
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)


def _names(text: str) -> set[str]:
    return {m.group(1).lower() for m in re.finditer(r"^([A-Za-z0-9._-]+)==", text, re.M)}


def test_cpu_torch_drops_torch_and_its_cuda_libraries_with_their_hashes():
    text = ("# header\n"
            "dvclive==3.0 \\\n    --hash=sha256:aa\n"
            "nvidia-cublas==13.1 \\\n    --hash=sha256:bb\n"
            "nvidia-ml-py==13.6 \\\n    --hash=sha256:cc\n"
            "torch==2.14.1 \\\n    --hash=sha256:dd\n"
            "torchmetrics==1.9.0 \\\n    --hash=sha256:ee\n"
            "torchvision==0.29.1 \\\n    --hash=sha256:ff\n"
            "triton==3.8.0 \\\n    --hash=sha256:gg\n")
    kept, pins = lock.cpu_torch(text)
    assert pins == ["torch==2.14.1+cpu", "torchvision==0.29.1+cpu"]
    assert kept == ("# header\ndvclive==3.0 \\\n    --hash=sha256:aa\nnvidia-ml-py==13.6 \\\n    --hash=sha256:cc\n"
                    "torchmetrics==1.9.0 \\\n    --hash=sha256:ee\n")


def test_cpu_torch_on_the_real_lock_leaves_nothing_requiring_a_dropped_package():
    """Against this environment's metadata (the one the lock was made from): what stays installs with
    --no-deps and finds every requirement, torch and torchvision coming back as the CPU pins."""
    text = (REPO / "requirements.lock").read_text()
    kept_text, pins = lock.cpu_torch(text)
    kept, dropped = _names(kept_text), _names(text) - _names(kept_text)
    assert {"torch", "torchvision", "triton", "cuda-toolkit", "nvidia-cudnn-cu13"} <= dropped
    assert "nvidia-ml-py" in kept and kept_text.count("--hash=sha256:") == len(kept)
    assert [p.split("+")[0] for p in pins] == [f"torch=={md.version('torch')}", f"torchvision=={md.version('torchvision')}"]
    for name in sorted(kept):
        for req in md.requires(name) or []:
            if "extra ==" in req:
                continue
            dep = re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0].lower().replace("_", "-")
            assert dep not in dropped - {"torch", "torchvision"}, f"{name} requires {req}"
