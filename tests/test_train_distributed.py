"""Data-parallel pretraining: batch split, data slots, the accumulated step = the global-batch step, bf16,
and real DDP (2 gloo processes under torchrun) against one process with the same batch by accumulation."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pas.models.backbone import create_backbone
from pas.models.files import seed_everything
from pas.params import ParamsError, build
from pas.train.data import slot_shards, ssl_loader, steps_per_epoch, two_view_transform
from pas.train.distributed import processes_per_node, split_batch, torchrun_argv
from pas.train.pretrain import PretrainParams, launch_processes, pretrain
from pas.train.ssl import build_model, momentum_at
from tests.train_helpers import TINY_PRETRAIN, TINY_VIT, synthetic_shards, tiny_backbone_init, write_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("batch,micro,world,want", [
    (4096, None, 8, (512, 1)),     # the paper's batch on 8 GPUs, no accumulation
    (4096, 256, 8, (256, 2)),
    (4096, 200, 8, (128, 4)),      # 512/3 is not whole: the fewest steps of at most 200 that divide 512
    (4096, 256, 1, (256, 16)),     # one GPU, same global batch
    (8, 4, 1, (4, 2)),
    (8, 4, 2, (4, 1)),
    (6, None, 3, (2, 1)),
])
def test_split_batch(batch, micro, world, want):
    assert split_batch(batch, micro, world) == want


@pytest.mark.parametrize("batch,micro,world,msg", [
    (10, None, 4, "batch_size=10 is not a multiple of the 4 processes"),
    (3, None, 3, "no micro-batch of 2..1 images"),
    (13, 3, 1, "micro_batch_size=3: no micro-batch of 2..3 images divides the 13"),   # prime
])
def test_split_batch_refuses(batch, micro, world, msg):
    with pytest.raises(ParamsError, match=msg.replace("(", r"\(")):
        split_batch(batch, micro, world)


def test_params_and_launch():
    def cfg(**kw):
        return build(PretrainParams, {"pretrain": kw}, "pretrain")

    assert cfg().devices == "auto" and cfg(devices=4).devices == 4
    for kw, msg in [({"devices": "all"}, "pretrain.devices='all' must be one of"),
                    ({"devices": 0}, "pretrain.devices=0 must be >= 1"),
                    ({"micro_batch_size": 1}, "pretrain.micro_batch_size=1 must be >= 2"),
                    ({"autocast": "float16"}, "pretrain.autocast='float16' must be one of"),
                    ({"sync_bn": "yes"}, "pretrain.sync_bn='yes': expected bool")]:
        with pytest.raises(ParamsError, match=msg.replace("(", r"\(")):
            cfg(**kw)
    assert processes_per_node("auto", "cpu") == 1 and processes_per_node(3, "cpu") == 3
    for kw, msg in [({"devices": 3, "batch_size": 8}, "batch_size=8 is not a multiple of the 3 processes"),
                    ({"devices": 2, "sync_bn": True}, "sync_bn=true needs CUDA")]:
        with pytest.raises(ParamsError, match=msg):   # refused before torchrun starts anything
            launch_processes(cfg(device="cpu", **kw))
    assert launch_processes(cfg(device="cpu", devices=2)) == 2
    import torch

    if not torch.cuda.is_available():     # `auto` is the CPU here: refused once, not in every worker
        with pytest.raises(ParamsError, match="sync_bn=true needs CUDA"):
            launch_processes(cfg(device="auto", devices=2, sync_bn=True))
    cmd = torchrun_argv(2, "stages/pretrain.py", ["--params", "p.yaml"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[3:] == ["--standalone", "--nproc-per-node=2", "stages/pretrain.py", "--params", "p.yaml"]


def test_data_slots_partition_the_shards_and_count_steps(tmp_path):
    shards = [f"s{i}" for i in range(5)]
    for epoch in range(3):
        dealt = [slot_shards(shards, 0, epoch, k, 2) for k in range(2)]
        assert sorted(dealt[0] + dealt[1]) == shards and not set(dealt[0]) & set(dealt[1])
        whole = slot_shards(shards, 0, epoch)   # one slot: the epoch's shuffled list, which 2 slots deal
        assert dealt == [whole[0::2], whole[1::2]] and whole != shards
    ds = synthetic_shards(tmp_path / "ds", 32, maxcount=8)          # 4 shards of 8
    assert steps_per_epoch(ds, 4, 0, 3) == 8                         # one stream: 32 // 4
    assert steps_per_epoch(ds, 4, 0, 3, n_slots=2) == 4              # 16 images per slot
    assert steps_per_epoch(ds, 3, 0, 3, num_workers=3) == 5 + 2 + 2  # each worker drops its own remainder
    assert steps_per_epoch(ds, 4, 0, 3, n_slots=5) == 0              # more streams than shards


def test_a_slot_streams_the_same_batches_alone_or_beside_another(tmp_path):
    """In one process (accumulation) a slot's views are those it gets in a process of its own (DDP)."""
    ds = synthetic_shards(tmp_path / "ds", 32, maxcount=8)
    tf = two_view_transform(32, [0.5] * 3, [0.5] * 3, min_scale=0.3)

    def loader(slot):
        return ssl_loader(ds, tf, 4, seed=0, epoch=1, shuffle_buffer=16, slot=slot, n_slots=2)

    seed_everything(123)
    alone = list(loader(1))
    seed_everything(7)
    beside = [b1 for _, b1 in zip(loader(0), loader(1))]
    assert len(alone) == len(beside) == 4
    for (a0, a1), (b0, b1) in zip(alone, beside):
        assert torch.equal(a0, b0) and torch.equal(a1, b1)
    other = list(loader(0))
    assert not torch.equal(other[0][0], alone[0][0])


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _bn_buffers(model) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if "running" in n}


@pytest.mark.parametrize("method", ["mocov3", "nnclr"])
def test_accumulated_step_is_the_step_of_the_whole_batch(tmp_path, method):
    """Two accumulated micro-batches give the loss, gradients, BN statistics and NN bank of one batch of both
    (BN statistics per micro-batch), computed here directly with autograd through the whole batch. MoCo v3
    accumulates query gradients against the keys of both; NNCLR runs GradCache."""
    torch.set_num_threads(1)
    init = tiny_backbone_init(tmp_path / "init")
    seed_everything(0)
    acc = build_model(method, create_backbone(init), hidden_dim=32, out_dim=16, pred_hidden_dim=32,
                      temperature=0.2, momentum=0.9, memory_bank_size=64)
    ref = copy.deepcopy(acc)
    g = torch.Generator().manual_seed(1)
    micro = [(torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)) for _ in range(2)]
    loss = acc.training_step(micro, 3, 10)

    if method == "mocov3":
        from lightly.models.utils import update_momentum

        m = momentum_at(3, 10, 0.9)
        update_momentum(ref.backbone, ref.backbone_momentum, m)
        update_momentum(ref.projection_head, ref.projection_head_momentum, m)
        keys = [(ref.forward_momentum(x0), ref.forward_momentum(x1)) for x0, x1 in micro]
        k0, k1 = torch.cat([k for k, _ in keys]), torch.cat([k for _, k in keys])
        q = [(ref(x0), ref(x1)) for x0, x1 in micro]
        q0, q1 = torch.cat([a for a, _ in q]), torch.cat([b for _, b in q])
        want = ref.criterion(q0, k1) + ref.criterion(q1, k0)   # one InfoNCE over the 8 queries and 8 keys
    else:
        out = [(ref(x0), ref(x1)) for x0, x1 in micro]
        z0, p0 = (torch.cat(t) for t in zip(*[o[0] for o in out]))
        z1, p1 = (torch.cat(t) for t in zip(*[o[1] for o in out]))
        nn0 = ref.memory_bank(z0.detach(), update=False)
        nn1 = ref.memory_bank(z1.detach(), update=True)
        want = 0.5 * (ref.criterion(nn0, p1) + ref.criterion(nn1, p0))
        assert torch.equal(acc.memory_bank.bank, ref.memory_bank.bank)
        assert int(acc.memory_bank.bank_ptr) == int(ref.memory_bank.bank_ptr) == 8
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    ga, gr = _grads(acc), _grads(ref)
    assert ga.keys() == gr.keys() and len(ga) > 10
    for name in ga:
        torch.testing.assert_close(ga[name], gr[name], rtol=1e-4, atol=1e-6, msg=name)
    ba, br = _bn_buffers(acc), _bn_buffers(ref)
    assert ba.keys() == br.keys() and ba   # GradCache's first forward leaves the running statistics alone
    for name in ba:
        torch.testing.assert_close(ba[name], br[name], rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_autocast_trains(tmp_path):
    ds = synthetic_shards(tmp_path / "ds", 16, maxcount=8)
    init = tiny_backbone_init(tmp_path / "init")
    curves = {}
    for precision in (None, "bfloat16"):
        cfg = build(PretrainParams, {"pretrain": {**TINY_PRETRAIN, "epochs": 1, "warmup_epochs": 0,
                                                  "autocast": precision}}, "pretrain")
        d = tmp_path / str(precision)
        pretrain(cfg, ds, init, d / "out", d / "ckpt", live_dir=d / "live", progress=False)
        rows = (d / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().split("\n")[1:]
        curves[precision] = [float(r.split("\t")[1]) for r in rows if r]
    bf16, fp32 = curves["bfloat16"], curves[None]
    assert len(bf16) == 2 and all(torch.isfinite(torch.tensor(bf16)))
    assert bf16 != fp32                                # the forward passes ran in bf16
    assert bf16[0] == pytest.approx(fp32[0], rel=0.05)  # same weights, same batch


# --- real DDP: 2 gloo processes on CPU, launched by torchrun ------------------------------------------------

def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}


def _worker(spec: dict, **kw) -> subprocess.Popen:
    cmd = torchrun_argv(2, str(ROOT / "tests" / "ddp_worker.py"), [json.dumps(spec)])
    return subprocess.Popen(cmd, env=_env(), text=True, **kw)


def _curve(d: Path) -> list[float]:
    rows = (d / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().split("\n")[1:]
    return [float(r.split("\t")[1]) for r in rows if r]


DDP = {**TINY_PRETRAIN, "memory_bank_size": 16}   # batch 8: 2 processes x 4, or 1 process x 2 micro-batches of 4


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """Both methods trained by 2 gloo processes (one torchrun), on 4 equal shards: 4 steps per epoch."""
    root = tmp_path_factory.mktemp("ddp")
    data, init = synthetic_shards(root / "ds", 32, maxcount=8), tiny_backbone_init(root / "init")
    runs = []
    for method in ("mocov3", "nnclr"):
        params = write_params(root / f"{method}.yaml", pretrain={**DDP, "method": method, "devices": 2},
                              models={"backbone_init": TINY_VIT})
        runs.append({"params": str(params), "dir": str(root / method)})
    proc = _worker({"data": str(data), "init": str(init), "runs": runs}, stdout=subprocess.DEVNULL)
    assert proc.wait(timeout=600) == 0
    return root, data, init


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mocov3", "nnclr"])
def test_ddp_gives_the_loss_curve_of_one_process_accumulating(tmp_path, ddp, method):
    """2 processes x 1 micro-batch vs 1 process x 2 micro-batches: the same micro-batches, the whole batch's loss.

    Tolerance. MoCo v3: equal. Each micro-batch is the same operations on the same data in both layouts, and
    the mean of two gradients (DDP: halved, then summed) equals two halves accumulated, exactly in floating
    point. NNCLR: the first step's loss to 1e-6 (same weights and batch; lightly's GatherLayer loss per process
    vs GradCache's loss of the whole batch sum in another order), the curve to 1e-3: AdamW's first updates
    lr·g/(|g|+eps) turn float-rounding differences of near-zero gradients into visible ones (measured: 1.3e-4
    by step 8)."""
    root, data, init = ddp
    cfg = build(PretrainParams, {"seed": 0, "pretrain": {**DDP, "method": method, "micro_batch_size": 4}},
                "pretrain")
    res = pretrain(cfg, data, init, tmp_path / "out", tmp_path / "ckpt", live_dir=tmp_path / "live",
                   progress=False)
    assert (res["processes"], res["accumulate"], res["micro_batch"], res["steps"]) == (1, 2, 4, 8)
    one, two = _curve(tmp_path), _curve(root / method)
    assert len(one) == len(two) == 8
    if method == "mocov3":
        assert one == two
        assert (tmp_path / "out" / "model.safetensors").read_bytes() == \
            (root / method / "out" / "model.safetensors").read_bytes()
    else:
        assert one[0] == pytest.approx(two[0], rel=1e-6)
        assert one == pytest.approx(two, rel=1e-3)
        assert one != two   # GatherLayer and GradCache are different computations


@pytest.mark.slow
def test_sigkill_of_one_rank_then_the_stage_resumes(tmp_path, ddp):
    """SIGKILL of rank 1 after the first checkpoint: torchrun stops rank 0 too; rerunning the stage (which
    starts torchrun itself, `devices: 2`) resumes after epoch 1 and ends with the uninterrupted run's bytes."""
    root, data, init = ddp
    params = root / "mocov3.yaml"
    run = {"params": str(params), "dir": str(tmp_path), "sleep": 120}
    victim = _worker({"data": str(data), "init": str(init), "runs": [run]}, stdout=subprocess.PIPE)
    pids = {}
    while len(pids) < 2:
        line = victim.stdout.readline()
        assert line, "the workers ended before their first checkpoint"
        for rank, pid in re.findall(r"EPOCH 1 RANK (\d) PID (\d+)", line):
            pids[int(rank)] = int(pid)
    os.kill(pids[1], signal.SIGKILL)
    assert victim.wait(timeout=120) != 0
    victim.stdout.close()
    with pytest.raises(ProcessLookupError):   # no orphan rank left training or writing
        os.kill(pids[0], 0)
    assert (tmp_path / "ckpt" / "last.pt").is_file() and not (tmp_path / "out").exists()

    stage = [sys.executable, str(ROOT / "stages" / "pretrain.py"), "--data", str(data), "--init", str(init),
             "--out", str(tmp_path / "out"), "--ckpt", str(tmp_path / "ckpt"), "--live", str(tmp_path / "live"),
             "--params", str(params), "--metrics", str(tmp_path / "m.json")]
    done = subprocess.run(stage, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_log = json.loads((tmp_path / "m.run.json").read_text())
    assert run_log["resumed_from_epoch"] == 1 and run_log["processes"] == 2
    ref = root / "mocov3"
    for f in ("out/model.safetensors", "out/pretrain.json", "live/plots/metrics/train/loss.tsv",
              "live/metrics.json"):
        assert (tmp_path / f).read_bytes() == (ref / f).read_bytes(), f
