"""DVC stage `params`: validate the whole params.yaml before any other stage runs.

Every other stage depends on `--out`, so DVC runs this one first whenever params.yaml (or a validator)
changed. A typo or a bad value anywhere, also under a key that no stage declares (which DVC alone would
silently ignore: no stage is out of date), then stops `dvc repro` / `dvc exp run` with one line naming
the key, before anything runs or DVC deletes any stage's outputs. The output's bytes never depend on
the values, so a passing check reruns nothing downstream.

With `--dvc-yaml` it also checks what DVC templating cannot express: the `evalsets` stage must depend
on every eval set's folder. dvc.yaml lists `${eval.root}`, the folder holding the sets, so a profile may
have any number of them (a template cannot loop over `eval.sets`); a set outside it needs its own
`${eval.sets[i].path}` (or literal path) line. And with `retrieve.backend: clip_service` nothing reads
`pool.source`, yet dvc.yaml's pool stage (and pool_models@clip/@sscd) depend on it: it must exist, or DVC
stops on a missing dep; the presets name the placeholder `configs/no-pool`. Input folders outside the
repository get a warning (`pas.params.outside_repo_deps`: `dvc exp show` misnames them).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from pas.params import check_dvc_yaml, load, outside_repo_deps, run_stage, stage_parser

log = logging.getLogger("pas.stages.params")

OK = "params.yaml passed pas.params.validate\n"   # constant: downstream stages see no change


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__)
    ap.add_argument("--out", default="data/params.ok")
    ap.add_argument("--dvc-yaml", help="also check this dvc.yaml's evalsets deps against eval.sets")
    args = ap.parse_args(argv)
    params = load(args.params)
    if args.dvc_yaml:
        check_dvc_yaml(params, args.dvc_yaml)
        for line in outside_repo_deps(params, Path(args.dvc_yaml).resolve().parent):
            log.warning(line)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(OK)
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
