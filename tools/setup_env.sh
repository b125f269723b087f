#!/usr/bin/env bash
# Build (or reuse) the project's isolated environment in .venv and install the pinned stack
# plus this package (editable). Idempotent: when requirements/constraints.txt and setup.py
# have not changed since the last successful run, it returns in well under a second.
#
# Usage: bash tools/setup_env.sh     (PYTHON: a Python 3.11, found on PATH by default; VENV=.venv)
set -euo pipefail

cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  for candidate in python3.11 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 \
        && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      PYTHON=$candidate
      break
    fi
  done
fi
if [ -z "${PYTHON:-}" ]; then
  echo "setup_env: Python 3.11 is needed (python3.11 not found); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
VENV=${VENV:-.venv}
CONSTRAINTS=requirements/constraints.txt
STAMP="$VENV/.mmdet-cam-hook-stamp"

want=$(cat "$CONSTRAINTS" setup.py | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

log() { printf '[setup_env %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q -c "$CONSTRAINTS" "$@"; }

# The registry's torch 2.9.1 for x86_64 is a CUDA build (it runs on the CPU): ~7.7 GB installed,
# plus pip's temporary copies while it installs. Say so up front rather than leave only pip's
# "No space left on device" halfway through.
free_kb=$(df -Pk "$(dirname "$VENV")" | awk 'NR == 2 {print $4}')
if [ -n "$free_kb" ] && [ "$free_kb" -lt $((10 * 1024 * 1024)) ]; then
  log "warning: $((free_kb / 1024)) MB free on the disk of $VENV; the environment needs about 10 GB while it installs"
fi
log "torch + torchvision (first time: a few minutes)"
pip_install torch torchvision
log "build tools, mmengine, grad-cam, visualizer backends (tensorboard, mlflow, wandb), opencv, test tools"
pip_install setuptools wheel numpy ninja mmengine opencv-python grad-cam tensorboard protobuf \
  mlflow-skinny wandb pytest ruff psutil import-linter

# mmcv 2.1.0 has no wheel for this torch: it compiles its C++ ops against the installed torch
# (about 15 minutes on 2 cores on a fresh machine; pip's wheel cache makes it seconds later).
if ! "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'" 2>/dev/null; then
  log "mmcv 2.1.0 with ops (compiles from source on a fresh machine: ~15 min)"
  MAX_JOBS=${MAX_JOBS:-$(nproc)} pip_install --no-build-isolation mmcv
fi
log "mmdet + this package (editable)"
pip_install mmdet
pip_install --no-build-isolation -e .
log "the multimodal extra (transformers, tokenizers: text-prompted detectors' tests)"
pip_install transformers tokenizers huggingface-hub safetensors

"$PY" -c "import mmcv.ops, mmdet, pytorch_grad_cam, mmdet_cam_hook" >/dev/null
echo "$want" > "$STAMP"
log "environment ready: $VENV"
