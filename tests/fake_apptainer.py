"""A recording stand-in for `apptainer`, used by tests/test_run_in.py and tests/test_containers.py.

The tests copy this file into a temporary bin directory as `apptainer` (with the running Python as its
shebang) and put that directory first on PATH. Every call appends its argv (without argv[0]) as one
JSON line to $FAKE_APPTAINER_LOG, then acts like the real command just enough to test what calls it:

- `exec [--nv] [--bind X] [--pwd D] [--env K=V[,K=V]] ... IMAGE CMD...`: applies APPTAINERENV_* and
  --env (CSV-split like Apptainer's parser), changes to --pwd, and execs CMD, so exit codes, signals
  and arguments behave as through the real one. An IMAGE file holding JSON `{"site": [dirs]}` stands
  for an image with packages installed: the dirs come after PYTHONPATH, as an image's site-packages
  do (e.g. the vLLM stand-in for the llm image);
- `build [options] OUT DEF`: writes OUT (exit status $FAKE_APPTAINER_BUILD_RC, default 0);
- `test [options] IMAGE`: exit status $FAKE_APPTAINER_TEST_RC (default 0).
"""

import csv
import json
import os
import sys

VALUE_FLAGS = {"--bind", "-B", "--pwd", "--env", "--build-arg"}


def split_options(args):
    """→ (options as [(flag, value|None)], positional args)."""
    opts, i = [], 0
    while i < len(args) and args[i].startswith("-"):
        if args[i] in VALUE_FLAGS:
            opts.append((args[i], args[i + 1]))
            i += 2
        else:
            opts.append((args[i], None))
            i += 1
    return opts, args[i:]


def main(argv):
    with open(os.environ["FAKE_APPTAINER_LOG"], "a") as f:
        f.write(json.dumps(argv) + "\n")
    verb, rest = argv[0], argv[1:]
    opts, pos = split_options(rest)
    if verb == "exec":
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPTAINERENV_")}
        env.update({k[len("APPTAINERENV_"):]: v for k, v in os.environ.items()
                    if k.startswith("APPTAINERENV_")})
        for flag, value in opts:
            if flag == "--env":
                for pair in next(csv.reader([value])):
                    name, _, val = pair.partition("=")
                    env[name] = val
            elif flag == "--pwd":
                os.chdir(value)
        try:
            with open(pos[0]) as f:
                site = json.load(f).get("site", [])
        except (OSError, ValueError, AttributeError):
            site = []
        if site:
            env["PYTHONPATH"] = os.pathsep.join([p for p in [env.get("PYTHONPATH")] if p] + site)
        cmd = pos[1:]
        os.execvpe(cmd[0], cmd, env)
    if verb == "build":
        out, definition = pos
        with open(out, "w") as f:
            f.write("fake image built from %s\n" % definition)
        return int(os.environ.get("FAKE_APPTAINER_BUILD_RC", "0"))
    if verb == "test":
        return int(os.environ.get("FAKE_APPTAINER_TEST_RC", "0"))
    sys.stderr.write("fake apptainer: unsupported verb %s\n" % verb)
    return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
