#!/usr/bin/env bash
# One short phantom experiment of examples/msd_colon.py on a CUDA GPU: 256x256 slices, batch 32,
# AMP (bf16 where supported) + channels_last; then a step-time benchmark (images/s and the share
# of step time spent in the loss). Results go to benchmarks/results/ (and $OUT when set).
# The data are the SYNTHETIC phantom; the numbers measure speed, not segmentation quality.
#
#   bash examples/run_gpu_example.sh            # about 2 minutes on one H100
#
# A machine without smp/nibabel/... and without network: put the wheels listed in
# docs/example.md into .whl/ first; they are installed into /tmp/site (no index, no deps).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
python3 - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device"
import segmentation_models_pytorch, nibabel, tqdm  # noqa: F401  (fail early and clearly)
print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))
PY
RUN=runs/gpu_example
RES=benchmarks/results
mkdir -p "$RES"
start=$(date +%s)
# 1) short experiment: one region loss, one distribution loss, their composite and the switch
timeout 240 python3 examples/msd_colon.py --device cuda --amp auto \
  --image-size 256 --batch-size 32 --lr 1e-3 --epochs 2 --long-epochs 4 --switch-epoch 2 \
  --phantom-patients 12 --phantom-size 256 --workers 4 --out "$RUN" --quiet
echo "experiment wall time: $(( $(date +%s) - start )) s"
# 2) step timing: images/s and the loss share of the step time, per loss
timeout 120 python3 examples/msd_colon.py --benchmark --benchmark-steps 50 --device cuda \
  --amp auto --image-size 256 --batch-size 32 --phantom-patients 12 --phantom-size 256 \
  --out "$RUN" --loss iou --loss bce --loss iou+bce --loss "iou->bce@1" --loss tversky \
  --loss topk --quiet
cp "$RUN/benchmark.json" "$RES/msd_colon_gpu_benchmark.json"
cp "$RUN/benchmark.md" "$RES/msd_colon_gpu_benchmark.md"
mkdir -p "$RES/msd_colon_gpu_run"
cp "$RUN"/report.md "$RUN"/runs.csv "$RUN"/*.png "$RES/msd_colon_gpu_run/" 2>/dev/null || true
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/results"
  cp -r "$RES/msd_colon_gpu_benchmark.json" "$RES/msd_colon_gpu_benchmark.md" \
    "$RES/msd_colon_gpu_run" "$OUT/results/"
fi
echo "total wall time: $(( $(date +%s) - start )) s"
