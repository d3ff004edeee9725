"""The torch device a stage runs on: one rule for every stage (`cpu | cuda | auto`)."""

from __future__ import annotations


def resolve_device(name: str, threads: int = 0, local_rank: int = 0) -> str:
    """The torch device for `name` (cpu | cuda | auto), this process's GPU under torchrun; sets the CPU
    thread count when threads > 0. `cuda` without a CUDA device is a one-line config error."""
    import torch

    from pas.params import ParamsError

    if threads > 0:
        torch.set_num_threads(threads)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError("device='cuda' but no CUDA device is available (use cpu or auto)")
    return f"cuda:{local_rank}" if name == "cuda" and local_rank else name
