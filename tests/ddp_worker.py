"""A torchrun worker for tests/test_train_distributed.py: `pretrain` of one or more runs, announcing each epoch.

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/ddp_worker.py '<json>'

json: {"data": shards, "init": backbone_init, "runs": [{"params": params.yaml, "dir": out dir, "sleep": s}]}.
After each epoch's checkpoint every rank prints `EPOCH <e> RANK <r> PID <pid>` and sleeps `sleep` seconds
(time for the test to kill it). The worker owns the process group: torch cannot set one up again in a
process after destroying it, so `pretrain` uses this one rather than creating its own per run.
"""

import json
import os
import sys
import time


def main() -> None:
    args = json.loads(sys.argv[1])
    import torch.distributed as dist

    from pas.train.distributed import World

    rank = World.from_env().rank
    dist.init_process_group("gloo")
    try:
        _runs(args, rank)
    finally:
        dist.destroy_process_group()


def _runs(args: dict, rank: int) -> None:
    from pas.params import build, load
    from pas.train.pretrain import PretrainParams, pretrain

    for run in args["runs"]:
        cfg = build(PretrainParams, load(run["params"]), "pretrain")

        def announce(epoch: int, sleep: float = run.get("sleep", 0)) -> None:
            sys.stdout.write(f"EPOCH {epoch} RANK {rank} PID {os.getpid()}\n")   # one write: ranks share the pipe
            sys.stdout.flush()
            time.sleep(sleep)

        d = run["dir"]
        pretrain(cfg, args["data"], args["init"], f"{d}/out", f"{d}/ckpt", live_dir=f"{d}/live", progress=False,
                 on_epoch_end=announce)


if __name__ == "__main__":
    main()
