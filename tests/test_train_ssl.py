"""MoCo v3 / NNCLR: the loss by hand, the momentum schedule, NN-bank state, and learning on real clipart."""

from __future__ import annotations

import math

import pytest
import torch

from pas.data.images import load_rgb
from pas.models.backbone import create_backbone
from pas.models.files import seed_everything
from pas.train.data import two_view_transform
from pas.train.ssl import MoCoV3Loss, build_model, momentum_at
from tests.train_helpers import tiny_backbone_init


def test_mocov3_loss_hand_computed():
    # q = k = e1, e2; τ = 0.5: logits = [[2, 0], [0, 2]], CE = log(1 + e^-2) per row, ×2τ = ×1
    q = torch.eye(2)
    loss = MoCoV3Loss(temperature=0.5)(q, q.clone())
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)
    # swapping the keys makes the positive the farthest: CE = log(1 + e^2)
    loss = MoCoV3Loss(temperature=0.5)(q, q.flip(0))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(2)), abs=1e-6)
    # scale invariant (inputs are L2-normalised)
    assert MoCoV3Loss(0.5)(3 * q, q).item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)
    with pytest.raises(ValueError):
        MoCoV3Loss(0.0)


@pytest.mark.parametrize("n", [1, 5])
def test_mocov3_loss_matches_reference(n):
    g = torch.Generator().manual_seed(n)
    q, k = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)
    qn, kn = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    ref = 0.0
    for i in range(n):   # InfoNCE of query i: positive key i among all keys
        logits = [float(qn[i] @ kn[j]) / 0.2 for j in range(n)]
        ref += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    assert MoCoV3Loss(0.2)(q, k).item() == pytest.approx(ref / n * 2 * 0.2, rel=1e-5)


def test_momentum_schedule():
    assert momentum_at(0, 100, 0.99) == pytest.approx(0.99)
    assert momentum_at(100, 100, 0.99) == pytest.approx(1.0)
    ms = [momentum_at(s, 100, 0.99) for s in range(101)]
    assert all(a <= b for a, b in zip(ms, ms[1:]))
    assert momentum_at(0, 1, 0.9) == 0.9


def test_nnclr_bank_travels_outside_state_dict(tmp_path):
    init = tiny_backbone_init(tmp_path / "init")
    seed_everything(0)
    m = build_model("nnclr", create_backbone(init), hidden_dim=32, out_dim=16, pred_hidden_dim=32,
                    temperature=0.1, memory_bank_size=64)
    x = torch.randn(4, 3, 32, 32)
    m.training_step([(x, x.flip(-1))], 0, 10)
    assert "memory_bank.bank" not in m.state_dict()       # why extra_state exists
    seed_everything(1)
    m2 = build_model("nnclr", create_backbone(init), hidden_dim=32, out_dim=16, pred_hidden_dim=32,
                     temperature=0.1, memory_bank_size=64)
    m2.load_state_dict(m.state_dict())
    assert not torch.equal(m2.memory_bank.bank, m.memory_bank.bank)
    m2.load_extra_state(m.extra_state())
    assert torch.equal(m2.memory_bank.bank, m.memory_bank.bank)
    assert int(m2.memory_bank.bank_ptr) == 4
    with pytest.raises(ValueError, match="unknown SSL method"):
        build_model("simclr", create_backbone(init), hidden_dim=8, out_dim=8, pred_hidden_dim=8, temperature=0.1)


@pytest.mark.parametrize("method", ["mocov3", "nnclr"])
def test_loss_decreases_on_real_clipart(tmp_path, clipart_food, method):
    """A few AdamW steps on one batch of two augmented views of 16 real clipart images lower the loss."""
    torch.set_num_threads(1)
    init = tiny_backbone_init(tmp_path / "init")
    seed_everything(0)
    tf = two_view_transform(32, [0.5] * 3, [0.5] * 3, min_scale=0.3)
    views = [tf(load_rgb(f, max_side=64)) for f in clipart_food[::20][:16]]
    x0, x1 = torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views])
    model = build_model(method, create_backbone(init), hidden_dim=64, out_dim=32, pred_hidden_dim=64,
                        temperature=0.2, momentum=0.9, memory_bank_size=32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(12):
        opt.zero_grad()
        loss = model.training_step([(x0, x1)], step, 12)   # forward + backward
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
