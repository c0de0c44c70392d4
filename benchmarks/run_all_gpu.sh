#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one call (about 8 minutes on one H100):
#   1. benchmarks/run_gpu.sh           CUDA kernel tests + kernel benchmark vs smp/MONAI/torch
#   2. examples/run_gpu_example.sh     short msd_colon phantom run at 256x256, batch 32, AMP,
#                                      images/s and the loss's share of the step time
# Results land in benchmarks/results/; when $OUT is set (the device tool) they are also packed
# into $OUT/gpu_results.tar.gz (the tool returns at most 8 files).
# smp, MONAI and nibabel come from wheels in .whl/ when the machine cannot pip-install:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform any -d .whl segmentation-models-pytorch==0.6.0 monai==1.6.1 nibabel==5.4.2
set -u
cd "$(dirname "$0")/.." || exit 1
OUTDIR="${OUT:-}"
START=$(date +%s)
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
mkdir -p benchmarks/results
OUT= BENCH_BUDGET="${BENCH_BUDGET:-90}" bash benchmarks/run_gpu.sh
echo "[run_all_gpu +$(( $(date +%s) - START ))s] kernels done"
OUT= timeout 330 bash examples/run_gpu_example.sh > benchmarks/results/msd_colon_gpu.log 2>&1
echo "[run_all_gpu +$(( $(date +%s) - START ))s] example done (rc=$?)"
tail -n 5 benchmarks/results/msd_colon_gpu.log
if [ -n "$OUTDIR" ]; then
    mkdir -p "$OUTDIR"
    tar czf "$OUTDIR/gpu_results.tar.gz" benchmarks/results runs/gpu_example/*.md \
        runs/gpu_example/*.csv runs/gpu_example/*.png 2>/dev/null
    cp benchmarks/results/gpu_run_summary.txt "$OUTDIR/" 2>/dev/null
fi
cat benchmarks/results/gpu_run_summary.txt 2>/dev/null
exit 0
