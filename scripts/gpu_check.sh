#!/usr/bin/env bash
# Every GPU path of llm-router against a real GPU, in under 5 minutes, with no network
# (scripts/gpu_check.py says what is checked). Without a GPU: "no GPU: skipped", exit 0.
#   scripts/gpu_check.sh [--keep]     on a machine with NVIDIA GPUs and their driver
# It uses .venv (./dev.sh) when there is one; else python3 if llm-lab-router is installed;
# else it installs the project from wheels carried in .whl/ (pip download them beforehand:
# the GPU machine has no network) into a throw-away venv.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "no GPU: skipped"
  exit 0
fi
py=.venv/bin/python
[ -x "$py" ] || py=python3
if ! "$py" -c "import llm_lab_router.cli" 2>/dev/null; then
  if [ ! -d .whl ]; then
    echo "gpu_check: llm-lab-router is not installed here (./dev.sh help, or carry its wheels in .whl/)" >&2
    exit 2
  fi
  venv="$(mktemp -d)/venv"
  python3 -m venv "$venv" && "$venv/bin/pip" install -q --no-index --find-links .whl . || exit 2
  py="$venv/bin/python"
fi
exec timeout 300 "$py" scripts/gpu_check.py "$@"
