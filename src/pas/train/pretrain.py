"""Self-supervised pretraining of the backbone on the curated dataset (paper §3.4, §4.1, App. D.2).

    for epoch in epochs:                         # an epoch is a pure function of (seed, epoch): see data.py
        for micro in loaders(seed, epoch):       # two augmented views of each micro-batch, streamed from shards
            loss = model.training_step(micro)    # MoCo v3 (ViT) or NNCLR (ResNet): forward + backward
            step optimiser, per-step LR schedule; log loss/lr (dvclive)
        checkpoint: model (+ momentum encoder, NN bank), optimiser, scheduler, RNG states, epoch, log history

Scale (paper: batch 4096): under torchrun every process runs this loop on its share of each batch, and a
share larger than `micro_batch_size` is split into micro-batches whose gradients accumulate
(`pas.train.distributed`: the loss is still that of the whole batch). `autocast: bfloat16` runs the forward
passes under bf16 autocast (and allows TF32 matmuls on CUDA); weights, gradients and optimiser stay fp32.
Rank 0 writes checkpoints and outputs.

Resume: DVC deletes a stage's outs before it reruns, so checkpoints live in a scratch folder that is not
a DVC out at all (`scratch/pretrain/`, git-ignored). Not `persist: true` on an out: an uncached persisted
out is missing in every fresh clone, which makes `dvc status` call pretrain changed and retrain for nothing.
A checkpoint is used only when its fingerprint (params + the bytes of the shards and init weights) matches the
run (and the process layout); a killed run then continues after its last finished epoch and ends with the
same bytes as an uninterrupted one (tested on CPU, with a real SIGKILL, in one process and of one of two).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from pas.device import resolve_device
from pas.jsonio import write_json
from pas.params import ParamsError, check_choice, check_range, check_seed
from pas.train.schedule import lr_factor

log = logging.getLogger(__name__)

CKPT_NAME = "last.pt"


@dataclass(frozen=True)
class PretrainParams:
    """Section `pretrain` of params.yaml (+ top-level `seed`)."""

    method: str = "mocov3"                 # mocov3 (ViTs) | nnclr (ResNets)
    image_size: int = 32                   # square training resolution (paper: 224); ViTs: = their img_size
    epochs: int = 5                        # paper: 300 (MoCo v3), 500 (NNCLR)
    batch_size: int = 64                   # paper: 4096 (MoCo v3), 4096 (NNCLR)
    lr: float = 1.5e-4                     # base LR, scaled by batch_size/256 (MoCo v3 ViT: 1.5e-4)
    weight_decay: float = 0.1              # MoCo v3 ViT: 0.1; NNCLR (LARS): 1e-6
    optimizer: str = "adamw"               # adamw | sgd | lars
    schedule: str = "cosine"               # cosine | constant (after linear warmup), stepped per batch
    warmup_epochs: int = 0                 # MoCo v3: 40
    momentum: float = 0.99                 # MoCo v3 momentum encoder m, cosine-increased to 1
    temperature: float = 0.2               # τ: 0.2 MoCo v3, 0.1 NNCLR
    hidden_dim: int = 1024                 # projector hidden width (paper: 4096 MoCo v3, 2048 NNCLR)
    out_dim: int = 256                     # projection/prediction output width
    pred_hidden_dim: int = 1024            # predictor hidden width (paper: 4096)
    memory_bank_size: int = 4096           # NNCLR support set (paper: 98304)
    freeze_patch_embed: bool = True        # MoCo v3 random patch projection (ViTs)
    min_scale: float = 0.08                # RandomResizedCrop lower scale bound
    num_workers: int = 0                   # DataLoader workers per micro-batch stream (shards split across them)
    shuffle_buffer: int = 1000             # webdataset shuffle buffer (samples)
    device: str = "cpu"                    # cpu | cuda | auto
    threads: int = 0                       # torch CPU threads (0: torch default); fixes float reduction order
    devices: int | str = "auto"            # processes on this node: N | auto (every GPU with CUDA, else 1)
    micro_batch_size: int | None = None    # most images per process per forward (memory); null: batch/processes
    autocast: str | None = None            # null | bfloat16: forward passes under autocast (+ TF32 on CUDA)
    sync_bn: bool = False                  # SyncBatchNorm across processes (MoCo v3's official code; CUDA)
    seed: int = 0                          # top-level seed

    def __post_init__(self) -> None:
        check_choice("method", self.method, ("mocov3", "nnclr"))
        check_choice("optimizer", self.optimizer, ("adamw", "sgd", "lars"))
        check_choice("schedule", self.schedule, ("cosine", "constant"))
        check_choice("device", self.device, ("cpu", "cuda", "auto"))
        check_choice("autocast", self.autocast, (None, "bfloat16"))
        if isinstance(self.devices, str):
            check_choice("devices", self.devices, ("auto",))
        else:
            check_range("devices", self.devices, 1, None, lo_open=False)
        if self.micro_batch_size is not None:
            check_range("micro_batch_size", self.micro_batch_size, 2, None, lo_open=False)
        for name in ("image_size", "epochs", "hidden_dim", "out_dim", "pred_hidden_dim", "memory_bank_size",
                     "shuffle_buffer"):
            check_range(name, getattr(self, name), 1, None, lo_open=False)
        check_range("batch_size", self.batch_size, 2, None, lo_open=False)
        for name in ("warmup_epochs", "num_workers", "weight_decay", "threads"):
            check_range(name, getattr(self, name), 0, None, lo_open=False)
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ParamsError(f"warmup_epochs={self.warmup_epochs} must be < epochs={self.epochs}")
        check_range("lr", self.lr, 0.0, None)
        check_range("momentum", self.momentum, 0.0, 1.0, hi_open=False)
        check_range("temperature", self.temperature, 0.0, None)
        check_range("min_scale", self.min_scale, 0.0, 1.0, hi_open=False)
        check_seed("seed", self.seed)


def launch_processes(cfg: PretrainParams) -> int:
    """How many processes the stage must start on this node: 1 inside torchrun (it already did). A layout
    that cannot work fails here, once, before any process starts."""
    from pas.train.distributed import processes_per_node, split_batch, under_torchrun

    if under_torchrun():
        return 1
    n = processes_per_node(cfg.devices, cfg.device)
    split_batch(cfg.batch_size, cfg.micro_batch_size, n)
    # the device each process will resolve (`auto` on a node without CUDA is the CPU), not the param
    if cfg.sync_bn and n > 1 and not resolve_device(cfg.device).startswith("cuda"):
        raise ParamsError("pretrain.sync_bn=true needs CUDA (torch's SyncBatchNorm); set it false on CPU")
    return n


def _fingerprint(cfg: PretrainParams, shard_dir: Path, init_dir: Path, layout: dict) -> str:
    """What a checkpoint is valid for: params, process layout, and the content of the shards and the
    init weights (`pas.io.resume.file_identity`, the one input-identity rule of resumable work)."""
    from pas.hashing import sha256_json
    from pas.io.resume import file_identity
    from pas.io.shards import list_shards

    inputs = [[p.name, file_identity(p)] for p in list_shards(shard_dir)]
    inputs += [[name, file_identity(init_dir / name)] for name in ("config.json", "model.safetensors")
               if (init_dir / name).is_file()]
    # other processes/micro-batches: other numerics
    return sha256_json({"params": asdict(cfg), "layout": layout, "inputs": inputs}, default=str)


def _save_atomic(obj: Any, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)   # a kill mid-write leaves the previous checkpoint intact


def _load_checkpoint(path: Path) -> dict | None:
    """The checkpoint at `path`, or None when there is none or it cannot be read (a copy cut short:
    warned, and training starts from scratch instead of crashing)."""
    import torch

    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:      # torch raises RuntimeError, EOFError, UnpicklingError, ... for a torn file
        log.warning("pretrain: ignoring unreadable checkpoint %s (%s: %s); starting from scratch",
                    path, type(e).__name__, e)
        return None
    if not isinstance(ckpt, dict):
        log.warning("pretrain: ignoring %s (not a pas checkpoint); starting from scratch", path)
        return None
    return ckpt


def _make_optimizer(cfg: PretrainParams, params: list, lr: float):
    import torch

    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
    from lightly.utils.lars import LARS

    # biases and norm scales: no weight decay, which lightly's LARS takes as "no layer-wise scaling either"
    # (SimCLR, BYOL and NNCLR exclude them from both)
    return LARS([{"params": [p for p in params if p.ndim >= 2]},
                 {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)


class _Logger:
    """Loss/LR history, written as a dvclive folder only by `close`, once training has succeeded.

    `live_dir` is a git-tracked `persist: true` out (dvc.yaml): a run that fails or is killed must leave
    the previous curves untouched, so nothing is written there while training. The history also rides
    in every checkpoint, so a resumed run writes the same curves as an uninterrupted one."""

    def __init__(self, live_dir: Path | None, history: list, scratch: Path):
        self.history: list = list(history)
        self.live_dir, self.scratch = live_dir, scratch

    def log(self, name: str, step: int, value: float) -> None:
        self.history.append((name, int(step), float(value)))

    def close(self, summary: dict) -> None:
        if self.live_dir is None:
            return
        import shutil

        from dvclive import Live

        # built beside the checkpoints, then swapped in whole: no stale file of an older run survives
        tmp = self.scratch / f".{self.live_dir.name}.live-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        live = Live(str(tmp), save_dvc_exp=False, dvcyaml=None, report=None)
        for name, step, value in self.history:
            live.step = step
            live.log_metric(name, value)
        live.summary.update(summary)
        live.make_summary()
        live.end()
        shutil.rmtree(self.live_dir, ignore_errors=True)
        self.live_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp), str(self.live_dir))


LAYOUT_KEYS = ("processes", "accumulate", "micro_batch")   # how a run was spread: run log, not results


def pretrain(cfg: PretrainParams, shard_dir: str | Path, init_dir: str | Path, out_dir: str | Path,
             ckpt_dir: str | Path, live_dir: str | Path | None = None, progress: bool = True,
             stop_after_epoch: int | None = None, on_epoch_end: Callable[[int], None] | None = None) -> dict | None:
    """Pretrain `init_dir`'s backbone on `shard_dir`; write `out_dir` (timm folder) and return a summary.

    Under torchrun every process calls this; rank 0 writes checkpoints and outputs and returns the summary,
    the others return None. `stop_after_epoch` ends the run after that many epochs as if it had been killed
    (for tests): the checkpoint is written, `out_dir` is not. Runs with torch's deterministic algorithms
    (restored after, as are the TF32 flags that bf16 sets on CUDA).
    """
    import torch

    from pas.train.distributed import World, process_group

    world = World.from_env()
    device = resolve_device(cfg.device, cfg.threads, world.local_rank)
    if cfg.sync_bn and world.size > 1 and not device.startswith("cuda"):
        raise ParamsError("pretrain.sync_bn=true needs CUDA (torch's SyncBatchNorm); set it false on CPU")
    flags = (torch.are_deterministic_algorithms_enabled(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if cfg.autocast and device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with process_group(world, device):
            return _pretrain(cfg, Path(shard_dir), Path(init_dir), Path(out_dir), Path(ckpt_dir),
                             Path(live_dir) if live_dir is not None else None, progress, stop_after_epoch,
                             on_epoch_end, world, device)
    finally:
        torch.use_deterministic_algorithms(flags[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags[1:]


def _pretrain(cfg: PretrainParams, shard_dir: Path, init_dir: Path, out_dir: Path, ckpt_dir: Path,
              live_dir: Path | None, progress: bool, stop_after_epoch: int | None,
              on_epoch_end: Callable[[int], None] | None, world, device: str) -> dict | None:
    import torch
    from tqdm import tqdm

    from pas.models.backbone import create_backbone, is_vit, read_config, save_backbone
    from pas.models.files import seed_everything
    from pas.train.data import (count_samples, epoch_seed, rng_state, set_rng_state, ssl_loader, steps_per_epoch,
                                two_view_transform)
    from pas.train.distributed import Parallel, split_batch
    from pas.train.ssl import build_model

    init_cfg = read_config(init_dir)   # the architecture: models.backbone_init in params.yaml
    built_for = int(init_cfg["pretrained_cfg"]["input_size"][-1])
    if is_vit(init_cfg) and built_for != cfg.image_size:
        raise ParamsError(f"pretrain.image_size={cfg.image_size} but the ViT in {init_dir} was built for "
                          f"{built_for} px: set models.backbone_init.kwargs.img_size={cfg.image_size}")
    micro, accumulate = split_batch(cfg.batch_size, cfg.micro_batch_size, world.size)
    n_slots = world.size * accumulate      # micro-batch streams per step, slot r*accumulate + a on process r
    n_images = count_samples(shard_dir)
    steps = steps_per_epoch(shard_dir, micro, cfg.seed, cfg.epochs, n_slots, cfg.num_workers)
    if steps < 1:
        if n_slots == 1:
            raise ParamsError(f"pretrain.batch_size={cfg.batch_size} is larger than the dataset "
                              f"({n_images} images in {shard_dir})")
        raise ParamsError(f"pretrain: the shards of {shard_dir} ({n_images} images) cannot give each of "
                          f"{n_slots} micro-batch streams ({world.size} processes x {accumulate}) a batch of "
                          f"{micro} every epoch: fewer processes, a larger micro_batch_size or more shards")
    total_steps = cfg.epochs * steps

    seed_everything(cfg.seed)
    backbone = create_backbone(init_dir)
    model = build_model(cfg.method, backbone, hidden_dim=cfg.hidden_dim, out_dim=cfg.out_dim,
                        pred_hidden_dim=cfg.pred_hidden_dim, temperature=cfg.temperature, momentum=cfg.momentum,
                        memory_bank_size=cfg.memory_bank_size, freeze_patch_embed=cfg.freeze_patch_embed).to(device)
    if cfg.sync_bn and world.size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    lr = cfg.lr * cfg.batch_size / 256
    optimizer = _make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps, cfg.epochs, cfg.warmup_epochs, cfg.schedule))
    pcfg = init_cfg["pretrained_cfg"]
    transform = two_view_transform(cfg.image_size, pcfg["mean"], pcfg["std"], cfg.min_scale)

    layout = {"processes": world.size, "accumulate": accumulate, "micro_batch": micro}
    fingerprint = _fingerprint(cfg, shard_dir, init_dir, layout)
    ckpt_path = ckpt_dir / CKPT_NAME
    start_epoch, history, resumed_from = 0, [], None
    ckpt = _load_checkpoint(ckpt_path)     # every process reads it: optimiser state is per process
    if ckpt is not None:
        if ckpt.get("fingerprint") == fingerprint:
            model.load_state_dict(ckpt["model"])
            model.load_extra_state(ckpt["extra"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            set_rng_state(ckpt["rng"])
            start_epoch, history, resumed_from = ckpt["epoch"], ckpt["history"], ckpt["epoch"]
            log.info("pretrain: resuming from %s after epoch %d", ckpt_path, start_epoch)
        else:
            log.info("pretrain: %s is from other params/data/processes; starting from scratch", ckpt_path)
        del ckpt
    par = Parallel(model, world, device, cfg.autocast)
    par.agree(start_epoch, "the epoch to resume after")
    main = world.rank == 0
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    logger = _Logger(live_dir if main else None, history, scratch=ckpt_dir)
    if world.size > 1 or accumulate > 1:
        log.info("pretrain: batch %d = %d processes x %d micro-batches x %d images", cfg.batch_size, world.size,
                 accumulate, micro)

    t0 = time.time()
    slots = range(world.rank * accumulate, (world.rank + 1) * accumulate)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        seed_everything(epoch_seed(cfg.seed, epoch, 0))   # augmentations of this epoch (one stream)
        loaders = [ssl_loader(shard_dir, transform, micro, cfg.seed, epoch, cfg.shuffle_buffer, cfg.num_workers,
                              slot=k, n_slots=n_slots, pin_memory=device.startswith("cuda")) for k in slots]
        losses = []
        for i, batches in enumerate(tqdm(zip(*loaders), total=steps, desc=f"pretrain epoch {epoch + 1}",
                                         disable=not (progress and main), leave=False)):
            if i >= steps:   # a shard list that grew since counting must not shift the schedule
                break
            step = epoch * steps + i
            batches = [(x0.to(device, non_blocking=True), x1.to(device, non_blocking=True)) for x0, x1 in batches]
            optimizer.zero_grad(set_to_none=True)
            loss = model.training_step(batches, step, total_steps, par)   # forward + backward
            if not torch.isfinite(loss):
                raise FloatingPointError(f"pretrain: loss is {loss.item()} at step {step} (lower pretrain.lr?)")
            optimizer.step()
            logger.log("train/lr", step, optimizer.param_groups[0]["lr"])
            scheduler.step()
            logger.log("train/loss", step, loss.item())
            losses.append(loss.item())
        epoch_loss = sum(losses) / max(1, len(losses))
        logger.log("epoch/loss", epoch + 1, epoch_loss)
        if main:
            _save_atomic({"fingerprint": fingerprint, "epoch": epoch + 1, "model": model.state_dict(),
                          "extra": model.extra_state(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "rng": rng_state(), "history": logger.history,
                          "params": asdict(cfg), "layout": layout}, ckpt_path)
        par.barrier()   # the checkpoint exists before any process goes on (or is killed)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < cfg.epochs:
            return {"stopped_after_epoch": epoch + 1}

    if not main:
        return None
    losses_epoch = [v for n, _, v in logger.history if n == "epoch/loss"]
    summary = {
        "method": cfg.method, "backbone": init_cfg["architecture"], "image_size": cfg.image_size,
        "n_images": n_images, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
        "steps": total_steps, "samples_seen": total_steps * cfg.batch_size,
        # backbone forward passes of training images (paper Figs 6-7): views through the online encoder
        "forward_passes": total_steps * cfg.batch_size * model.n_views,
        "loss_first_epoch": losses_epoch[0] if losses_epoch else None,
        "loss_last_epoch": losses_epoch[-1] if losses_epoch else None,
        "resumed_from_epoch": resumed_from,
    }
    save_backbone(model.backbone.to("cpu"), out_dir, image_size=cfg.image_size)
    train_info = {k: v for k, v in summary.items() if k != "resumed_from_epoch"}
    write_json(out_dir / "pretrain.json", train_info)
    # not resumed_from_epoch: dvclive's metrics.json is tracked, and a resumed run must write the same bytes
    logger.close({k: v for k, v in train_info.items() if isinstance(v, (int, float))})
    summary["seconds"] = round(time.time() - t0, 1)
    summary.update(layout)
    return summary
