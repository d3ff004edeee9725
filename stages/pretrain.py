"""DVC stage `pretrain`: self-supervised pretraining (MoCo v3 / NNCLR) of models/backbone_init on the dataset.

Checkpoints go to --ckpt, a git-ignored scratch folder that is not a DVC out (DVC deletes outs before a
rerun), so a killed `dvc repro` resumes after the last finished epoch; dvclive curves go to --live.
With `pretrain.devices` > 1 (or auto on a GPU node) the script replaces itself by
`torchrun --standalone --nproc-per-node=N` running this same script; started by torchrun (one node, or
srun + torchrun on several, see README), it runs as one of the workers and rank 0 writes the outputs.
"""

from __future__ import annotations

import logging
import os
import sys

from pas.io.manifest import write_metrics
from pas.params import build, load, run_stage, stage_parser
from pas.train.distributed import World, relaunch
from pas.train.pretrain import LAYOUT_KEYS, PretrainParams, launch_processes, pretrain

log = logging.getLogger("pas.pretrain")


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__, "metrics/pretrain.json")
    ap.add_argument("--data", default="data/dataset", help="final dataset shards (prune output)")
    ap.add_argument("--init", default="models/backbone_init", help="backbone architecture + init weights")
    ap.add_argument("--out", default="models/backbone")
    ap.add_argument("--ckpt", default="scratch/pretrain", help="checkpoints (not a DVC out)")
    ap.add_argument("--live", default="dvclive/pretrain")
    args = ap.parse_args(argv)
    main_rank = World.from_env().rank == 0
    if not main_rank:                     # one rank's log is the run's; the others warn only
        logging.getLogger("pas").setLevel(logging.WARNING)
    p = build(PretrainParams, load(args.params), "pretrain")
    n = launch_processes(p)
    if n > 1:
        log.info("pretrain: starting %d processes with torchrun", n)
        relaunch(n, os.path.abspath(__file__), sys.argv[1:] if argv is None else argv)   # does not return
    summary = pretrain(p, args.data, args.init, args.out, args.ckpt, live_dir=args.live, progress=main_rank)
    if summary is None:   # not rank 0: rank 0 writes the outputs
        return 0
    write_metrics(args.metrics, summary, run_keys=LAYOUT_KEYS)
    log.info("pretrain: %s %s, %d images x %d epochs, loss %.4f -> %.4f, %.1fs%s", summary["method"],
             summary["backbone"], summary["n_images"], summary["epochs"], summary["loss_first_epoch"],
             summary["loss_last_epoch"], summary["seconds"],
             f" (resumed after epoch {summary['resumed_from_epoch']})" if summary["resumed_from_epoch"] else "")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
