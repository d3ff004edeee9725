"""Data-parallel pretraining: processes (torch DDP, launched by torchrun) × micro-batches (gradient accumulation).

One optimiser step consumes the global batch `pretrain.batch_size` as K = world_size × accumulate micro-batches,
the step's *data slots*: process r computes slots r·A … r·A + A − 1 one after another, and DDP averages the
processes' gradients. Slot k streams its own share of the shards (`pas.train.data.ssl_loader`), so which images
form which micro-batch depends on K only: 2 processes × 1 micro-batch and 1 process × 2 micro-batches train on the
same micro-batches in the same steps. What then spans the global batch, and what only a micro-batch:

- negatives, the loss and its gradient: the global batch. MoCo v3 gathers the keys of every slot before the
  queries' loss (concat_all_gather, as the official code does). NNCLR's NT-Xent gathers the predictions across
  processes with their gradient (lightly's GatherLayer); with accumulation it runs GradCache (Gao et al. 2021,
  arXiv:2101.06983): the loss of the whole batch on cached projections, then one backward per micro-batch with
  the cached gradients. The NN support set is updated with the whole batch. Exact up to float summation order.
- BatchNorm statistics (the projection/prediction heads, and ResNet backbones): the micro-batch, unless
  `pretrain.sync_bn` (SyncBatchNorm across processes, as MoCo v3's official code; CUDA only), where they span
  the processes' micro-batches of one accumulation round, so layouts are no longer equivalent.

The CPU single-process run (world 1, accumulate 1) runs the very operations it always ran: the same bytes.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Sequence

from pas.params import ParamsError


@dataclass(frozen=True)
class World:
    """This process's place among the torchrun workers (1 process, rank 0 without torchrun)."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "World":
        env = os.environ
        return cls(int(env.get("WORLD_SIZE", 1)), int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)))


def under_torchrun() -> bool:
    """True in a worker that torchrun (or any torch.distributed launcher) started."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def processes_per_node(devices: int | str, device: str) -> int:
    """`pretrain.devices` resolved: N, or "auto" = every GPU of the node on CUDA, 1 process on CPU."""
    import torch

    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if devices == "auto":
        return max(1, torch.cuda.device_count()) if cuda else 1
    if cuda and devices > torch.cuda.device_count():
        raise ParamsError(f"pretrain.devices={devices} but this node has {torch.cuda.device_count()} GPUs")
    return int(devices)


def split_batch(batch_size: int, micro_batch_size: int | None, world_size: int) -> tuple[int, int]:
    """(micro-batch per process, accumulation steps) for a global `batch_size` over `world_size` processes.

    The fewest accumulation steps whose micro-batch is at most `micro_batch_size` (None: no limit) and divides
    the batch evenly, so every process and every step sees a micro-batch of one size."""
    if batch_size % world_size:
        raise ParamsError(f"pretrain.batch_size={batch_size} is not a multiple of the {world_size} processes")
    per_process = batch_size // world_size
    limit = per_process if micro_batch_size is None else micro_batch_size
    for accumulate in range(1, per_process + 1):
        micro = per_process // accumulate
        if per_process % accumulate == 0 and micro <= limit:
            if micro < 2:
                break
            return micro, accumulate
    raise ParamsError(f"pretrain.micro_batch_size={micro_batch_size}: no micro-batch of 2..{limit} images divides "
                      f"the {per_process} images per process (batch_size={batch_size} over {world_size} processes)")


def torchrun_argv(nproc: int, script: str, argv: Sequence[str]) -> list[str]:
    """The command that runs `script argv` as `nproc` workers on this node (torchrun --standalone)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            script, *argv]


def relaunch(nproc: int, script: str, argv: Sequence[str]) -> None:
    """Replace this process by torchrun running `nproc` copies of `script` (exit code and signals pass through)."""
    cmd = torchrun_argv(nproc, script, argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


class Parallel:
    """How this process takes part in a step: its rank, the DDP-wrapped online network, autocast, gathers.

    `online(x0, x1)` is the trained network on both views of a micro-batch; under DDP it is the one module whose
    forward/backward pair syncs gradients, and `sync(last)` skips that sync for all but the last micro-batch.
    Without torchrun (world size 1) every collective is the identity, and no autocast is no context at all."""

    def __init__(self, model, world: World = World(), device: str = "cpu", autocast: str | None = None):
        import torch

        from pas.train.ssl import TwoViews

        self.world = world
        self.device_type = torch.device(device).type
        self.dtype = getattr(torch, autocast) if autocast else None
        online = TwoViews(model)
        if world.size > 1:
            import inspect

            from torch.nn.parallel import DistributedDataParallel as DDP

            # no per-forward buffer broadcast: BN running stats do not enter a training step, and the NN
            # support set (a buffer) is kept identical on every process by gathering (torch >= 2.14 renames
            # broadcast_buffers; the container's torch may be older)
            no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
                else "broadcast_buffers"
            online = DDP(online, device_ids=[world.local_rank] if self.device_type == "cuda" else None,
                         **{no_sync: False})
        self.online = online

    @property
    def rank(self) -> int:
        return self.world.rank

    def autocast(self):
        import torch

        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def sync(self, last: bool):
        """Context for one micro-batch's forward + backward: gradients are all-reduced only after the last."""
        if self.world.size > 1 and not last:
            return self.online.no_sync()
        return contextlib.nullcontext()

    def gather(self, x):
        """x of every process, concatenated in rank order (no gradient); x itself in a single process."""
        if self.world.size == 1:
            return x
        from lightly.models.utils import concat_all_gather

        return concat_all_gather(x.contiguous())

    def mean(self, x):
        """The mean of a scalar over processes (for logging the loss of the whole batch)."""
        if self.world.size == 1:
            return x
        import torch.distributed as dist

        x = x.detach().clone()
        dist.all_reduce(x)
        return x / self.world.size

    def barrier(self) -> None:
        if self.world.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def agree(self, value: Any, what: str) -> None:
        """Fail on every process when the processes disagree on `value` (e.g. the epoch they resumed after)."""
        if self.world.size == 1:
            return
        import torch.distributed as dist

        values: list = [None] * self.world.size
        dist.all_gather_object(values, value)
        if any(v != values[0] for v in values):
            raise RuntimeError(f"pretrain: processes disagree on {what}: {values}")


@contextlib.contextmanager
def process_group(world: World, device: str):
    """torch.distributed set up for this torchrun worker (NCCL on CUDA, gloo on CPU); nothing in one process."""
    if world.size == 1:
        yield
        return
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(world.local_rank)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()
