#!/usr/bin/env bash
# The seg3d GPU benchmark in one command, on a lent GPU machine, inside its 10-minute limit:
# 32 synthetic volumes of 128^3, 96^3 patches, AMP; seg3d with all mlpipe logging against a
# plain MONAI loop (the fast-training recipe) with the same model and data. Prints one JSON
# line per benchmark: samples/s, epoch time, peak GPU memory, time to val_dice 0.9, ratio.
#
#   bash benchmarks/gpu.sh             # the issue's sizes
#   EPOCHS=20 bash benchmarks/gpu.sh   # shorter, if the budget is tight
#
# Needs torch with CUDA, monai, mlflow, nibabel (pip install -e . on the machine, or the
# packages already there); figures go to $OUT when set (the device tool), else ./bench-results.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT_DIR=${OUT:-bench-results}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/projects/seg3d${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<'PYCHECK'
import importlib, sys
missing = [m for m in ("torch", "monai", "mlflow", "nibabel") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing packages: {', '.join(missing)}; run `pip install -e .` first")
import torch
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch: this benchmark is for a GPU machine")
print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
PYCHECK
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# seg3d vs plain MONAI, same model and data (about 2 x 40 epochs of 26 volumes on an H100/H200)
timeout 420 "$PY" benchmarks/seg3d_vs_monai.py --count 32 --size 128 --patch 96 \
  --epochs "${EPOCHS:-40}" --val-every 5 --batch-size 2 | tee "$OUT_DIR/gpu_seg3d_vs_monai.json"
# what logging costs the GPU loop (logging on vs off), a short run
timeout 150 "$PY" benchmarks/seg3d_train.py --count 32 --size 128 --patch 96 --epochs 6 \
  --repeats 1 | tee "$OUT_DIR/gpu_seg3d_train.json"
