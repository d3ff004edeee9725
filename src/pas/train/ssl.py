"""Self-supervised methods of the paper (§4.1, App. D.2): MoCo v3 for ViTs, NNCLR for ResNets.

Both wrap a timm backbone (created with num_classes=0, so it returns pooled features) with lightly's heads.
`model.training_step(micro_batches, step, total_steps, par)` runs the forward and backward passes of one
optimiser step, whose batch is the micro-batches [(x0, x1), ...] of this process together with those of the
other processes (`par`, a `pas.train.distributed.Parallel`); it updates the method's own state (momentum
encoder, nearest-neighbour bank) and returns the loss of the whole batch. The loop in `pas.train.pretrain`
steps the optimiser. How the loss spans processes and micro-batches: `pas.train.distributed`.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

Views = Sequence[tuple[torch.Tensor, torch.Tensor]]


class _Local:
    """A single process with no autocast: what `training_step` runs on when no `Parallel` is given."""

    rank = 0
    online = None

    def autocast(self):
        return contextlib.nullcontext()

    def sync(self, last: bool):
        return contextlib.nullcontext()

    def gather(self, x):
        return x

    def mean(self, x):
        return x


class TwoViews(nn.Module):
    """The online network on both views of a micro-batch, one call: the module DDP wraps and syncs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x0: torch.Tensor, x1: torch.Tensor):
        return self.model(x0), self.model(x1)


def _online(par, model: nn.Module):
    return par.online if par.online is not None else TwoViews(model)


@contextlib.contextmanager
def _bn_stats_kept(model: nn.Module):
    """BatchNorm running statistics restored after the block (a forward that will be repeated must not
    count twice)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    try:
        yield
    finally:
        for m, (mean, var, n) in zip(bns, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(n)


class MoCoV3Loss(nn.Module):
    """MoCo v3 contrastive loss (arXiv:2104.02057, Alg. 1).

    ctr(q, k) = CrossEntropy(q·kᵀ/τ, arange(N)) · 2τ with q, k L2-normalised: the positive of query i is key i
    (the other view of the same image, from the momentum encoder); the other N−1 keys are its negatives.
    Unlike lightly's NTXentLoss, queries are not contrasted against the queries of the same view.
    With keys gathered from several micro-batches or processes, the positive of query i is key `first` + i.
    """

    def __init__(self, temperature: float = 0.2):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, q: torch.Tensor, k: torch.Tensor, first: int = 0) -> torch.Tensor:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)    # (N, C), (M, C) with M >= first + N
        logits = q @ k.T / self.temperature                    # (N, M): logits[i, j] = cos(q_i, k_j)/τ
        labels = torch.arange(q.shape[0], device=q.device) + first
        return F.cross_entropy(logits, labels) * 2 * self.temperature


def momentum_at(step: int, total_steps: int, base: float) -> float:
    """MoCo v3 / BYOL momentum: m increased from `base` to 1 with a half-cycle cosine over training."""
    if total_steps <= 1:
        return base
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / total_steps) + 1) / 2


class MoCoV3(nn.Module):
    """MoCo v3: backbone → 3-layer projector (BN) → 2-layer predictor; momentum copy of backbone+projector.

    Heads follow the paper (projector 3 layers, predictor 2 layers, BN on hidden layers, 256-d output; hidden
    width 4096 in the paper, `hidden_dim` here). lightly 1.6 has no MoCoV3ProjectionHead, so the projector is
    MoCoProjectionHead(num_layers=3, batch_norm=True) and the predictor BYOLPredictionHead.
    Loss: ctr(q1, k2) + ctr(q2, k1).
    """

    method = "mocov3"
    n_views = 2

    def __init__(self, backbone: nn.Module, hidden_dim: int = 4096, out_dim: int = 256,
                 pred_hidden_dim: int = 4096, temperature: float = 0.2, momentum: float = 0.99,
                 freeze_patch_embed: bool = True):
        super().__init__()
        from lightly.models.modules import BYOLPredictionHead, MoCoProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        d = backbone.num_features
        self.backbone = backbone
        self.projection_head = MoCoProjectionHead(d, hidden_dim, out_dim, num_layers=3, batch_norm=True)
        self.prediction_head = BYOLPredictionHead(out_dim, pred_hidden_dim, out_dim)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        if freeze_patch_embed and hasattr(backbone, "patch_embed"):
            # "random patch projection" (MoCo v3 §4.2) stabilises ViT training
            backbone.patch_embed.requires_grad_(False)
        self.criterion = MoCoV3Loss(temperature)
        self.base_momentum = momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prediction_head(self.projection_head(self.backbone(x)))

    @torch.no_grad()
    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x))

    def training_step(self, micro: Views, step: int, total_steps: int, par=_Local()) -> torch.Tensor:
        from lightly.models.utils import update_momentum

        m = momentum_at(step, total_steps, self.base_momentum)
        update_momentum(self.backbone, self.backbone_momentum, m)
        update_momentum(self.projection_head, self.projection_head_momentum, m)
        # keys need no gradient: those of the whole batch first, the negatives of every query
        with par.autocast():
            keys = [(self.forward_momentum(x0), self.forward_momentum(x1)) for x0, x1 in micro]
        k0, k1 = (par.gather(torch.cat([k[v] for k in keys]).float()) for v in (0, 1))
        online, n, total = _online(par, self), micro[0][0].shape[0], 0.0
        for i, (x0, x1) in enumerate(micro):
            with par.sync(i == len(micro) - 1):
                with par.autocast():
                    q0, q1 = online(x0, x1)
                first = (par.rank * len(micro) + i) * n      # this micro-batch's keys among the gathered ones
                loss = self.criterion(q0.float(), k1, first) + self.criterion(q1.float(), k0, first)
                (loss / len(micro)).backward()
            total = total + loss.detach()
        return par.mean(total / len(micro))

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


class NNCLR(nn.Module):
    """NNCLR (arXiv:2104.14548): the positive of a view is the nearest neighbour of the other view's
    projection in a FIFO support set, ℒ = ½(NTXent(NN(z0), p1) + NTXent(NN(z1), p0)), τ = 0.1 in the paper.
    """

    method = "nnclr"
    n_views = 2

    def __init__(self, backbone: nn.Module, hidden_dim: int = 2048, out_dim: int = 256,
                 pred_hidden_dim: int = 4096, temperature: float = 0.1, memory_bank_size: int = 98304):
        super().__init__()
        from lightly.loss import NTXentLoss
        from lightly.models.modules import NNCLRPredictionHead, NNCLRProjectionHead, NNMemoryBankModule

        d = backbone.num_features
        self.backbone = backbone
        self.projection_head = NNCLRProjectionHead(d, hidden_dim, out_dim)
        self.prediction_head = NNCLRPredictionHead(out_dim, pred_hidden_dim, out_dim)
        self.memory_bank = NNMemoryBankModule(size=(memory_bank_size, out_dim))
        # lightly's own DDP handling, inert in one process: the bank is updated with the batch of every
        # process (MemoryBankModule's flag, which NNMemoryBankModule does not take), and NT-Xent contrasts
        # against the predictions of every process, with their gradient (GatherLayer)
        self.memory_bank.gather_distributed = True
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.projection_head(self.backbone(x))
        return z, self.prediction_head(z)

    def _loss(self, z0, p0, z1, p1) -> torch.Tensor:
        nn0 = self.memory_bank(z0.detach().float(), update=False)
        nn1 = self.memory_bank(z1.detach().float(), update=True)
        return 0.5 * (self.criterion(nn0, p1.float()) + self.criterion(nn1, p0.float()))

    def training_step(self, micro: Views, step: int, total_steps: int, par=_Local()) -> torch.Tensor:
        online = _online(par, self)
        if len(micro) == 1:
            with par.sync(True):
                with par.autocast():
                    (z0, p0), (z1, p1) = online(*micro[0])
                loss = self._loss(z0, p0, z1, p1)
                loss.backward()
            return par.mean(loss.detach())
        # accumulation: NT-Xent couples the predictions of the whole batch, so GradCache (arXiv:2101.06983):
        # forward every micro-batch without gradient, the loss and its gradient w.r.t. the cached
        # predictions, then each micro-batch again with gradient, backpropagating those. The second forward
        # equals the first (same micro-batch, same BN batch statistics; no dropout in these networks).
        with torch.no_grad(), _bn_stats_kept(self), par.autocast():
            outs = [(self(x0), self(x1)) for x0, x1 in micro]
        z0, z1 = (torch.cat([o[v][0] for o in outs]) for v in (0, 1))
        p0, p1 = (torch.cat([o[v][1] for o in outs]).float().requires_grad_() for v in (0, 1))
        loss = self._loss(z0, p0, z1, p1)
        loss.backward()   # across processes GatherLayer sums the gradients, which DDP's mean then undoes
        n = micro[0][0].shape[0]
        g0, g1 = p0.grad.split(n), p1.grad.split(n)
        for i, (x0, x1) in enumerate(micro):
            with par.sync(i == len(micro) - 1):
                with par.autocast():
                    (_, q0), (_, q1) = online(x0, x1)
                ((q0.float() * g0[i]).sum() + (q1.float() * g1[i]).sum()).backward()
        return par.mean(loss.detach())

    def extra_state(self) -> dict:
        # lightly registers the bank as a non-persistent buffer: state_dict() leaves it out
        return {"bank": self.memory_bank.bank.clone(), "bank_ptr": self.memory_bank.bank_ptr.clone()}

    def load_extra_state(self, state: dict) -> None:
        device = self.memory_bank.bank.device
        self.memory_bank.bank = state["bank"].to(device, copy=True)
        self.memory_bank.bank_ptr = state["bank_ptr"].to(device, copy=True)


def build_model(method: str, backbone: nn.Module, *, hidden_dim: int, out_dim: int, pred_hidden_dim: int,
                temperature: float, momentum: float = 0.99, memory_bank_size: int = 4096,
                freeze_patch_embed: bool = True) -> nn.Module:
    if method == "mocov3":
        return MoCoV3(backbone, hidden_dim, out_dim, pred_hidden_dim, temperature, momentum, freeze_patch_embed)
    if method == "nnclr":
        return NNCLR(backbone, hidden_dim, out_dim, pred_hidden_dim, temperature, memory_bank_size)
    raise ValueError(f"unknown SSL method {method!r} (mocov3 | nnclr)")
