#!/usr/bin/env bash
# Everything issue #12 measures on a GPU, in one call: under 8 minutes on one H100/H200.
#
#   bash benchmarks/run_all_gpu.sh                 # on the GPU machine (no registry needed)
#   bash benchmarks/run_all_gpu.sh --fetch-wheels  # beforehand, where PyPI is reachable
#   bash benchmarks/run_all_gpu.sh --check         # preflight only (works without a GPU)
#
# 1. Preflight, failing loudly and early: an NVIDIA GPU, a python3 with torch (CUDA) and
#    Triton, pytest, pip, the source tree, and the competitors' wheels in .whl/ (smp 0.6.0 and
#    MONAI 1.6.1: the GPU machine has no registry and neither package); git-ignored, carry
#    it: the device tool's `carry: [".whl"]`). Their dependencies (numpy, timm, torchvision,
#    huggingface_hub, safetensors, pillow, tqdm) are on the GPU image.
# 2. The wheels are installed into /tmp/site (no index, no dependencies).
# 3. benchmarks/run_gpu.sh: the CUDA tests (values, gradients, NaN semantics, launch counts,
#    no host sync, CUDA graph capture and replay, torch.compile fullgraph and reduce-overhead),
#    benchmarks/cuda_selfcheck.py, then benchmarks/bench_cuda.py (eager, device time,
#    launches, reduce-overhead, peak memory, host time; dynloss, smp, MONAI, torch, nnU-Net).
# Results: benchmarks/results/ (named after the device); with $OUT set (the device tool)
# also $OUT/gpu_results.tar.gz, the summary and the benchmark's report. Exit status: 0 when
# every step passed, 1 when one failed (the results are written either way), 2 when the
# preflight failed.
set -u
cd "$(dirname "$0")/.." || exit 2
WHEELS=(segmentation_models_pytorch-0.6.0-py3-none-any.whl monai-1.6.1-py3-none-any.whl)
PY="${PYTHON:-python3}"
START=$(date +%s)

if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p .whl
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform any -d .whl \
        segmentation-models-pytorch==0.6.0 monai==1.6.1 || exit 2
    grep -qx "/.whl/" .gitignore 2>/dev/null || echo "note: .whl/ should stay git-ignored"
    ls -l .whl
    exit 0
fi

fail() { echo "run_all_gpu: PREFLIGHT FAILED: $*" >&2; exit 2; }
preflight() {
    local gpu="$1"
    [ -f src/dynloss/kernels/triton/stream.py ] || fail "run from a dynloss checkout (no src/)"
    for w in "${WHEELS[@]}"; do
        [ -f ".whl/$w" ] || fail ".whl/$w is missing: run 'bash benchmarks/run_all_gpu.sh \
--fetch-wheels' where PyPI is reachable and carry .whl"
    done
    command -v "$PY" >/dev/null 2>&1 || fail "no $PY"
    "$PY" -c "import torch, triton" 2>/dev/null || fail "$PY cannot import torch and triton"
    "$PY" -c "import pytest" 2>/dev/null || fail "$PY has no pytest"
    "$PY" -m pip --version >/dev/null 2>&1 || fail "$PY has no pip (it installs the wheels)"
    if [ "$gpu" = 1 ]; then
        command -v nvidia-smi >/dev/null 2>&1 || fail "no nvidia-smi: not an NVIDIA GPU machine"
        "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null \
            || fail "torch sees no CUDA device"
    fi
    bash -n benchmarks/run_gpu.sh || fail "benchmarks/run_gpu.sh does not parse"
}

if [ "${1:-}" = "--check" ]; then
    preflight 0
    echo "run_all_gpu: preflight ok (GPU checks skipped)"
    exit 0
fi
preflight 1
echo "[run_all_gpu +$(( $(date +%s) - START ))s] preflight ok"
rm -rf /tmp/site
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl || fail "installing the wheels from .whl/ failed"
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
# a peer that does not import (a dependency missing on this image) is not fatal: the GPU time
# is scarce, and bench_cuda.py then takes the copies in benchmarks/.vendor or leaves that
# peer out, saying so in its report
for module in segmentation_models_pytorch monai.losses; do
    "$PY" -c "import $module" >/dev/null 2>&1 || {
        echo "run_all_gpu: WARNING: $module does not import from /tmp/site:" >&2
        "$PY" -c "import $module" 2>&1 | tail -n 3 >&2
    }
done
mkdir -p benchmarks/results
PYTHON="$PY" bash benchmarks/run_gpu.sh
rc=$?
echo "[run_all_gpu +$(( $(date +%s) - START ))s] run_gpu.sh finished (rc=$rc)"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    tar czf "$OUT/gpu_results.tar.gz" benchmarks/results
    cp benchmarks/results/gpu_run_summary.txt "$OUT/" 2>/dev/null
    cp benchmarks/results/bench_*.md "$OUT/" 2>/dev/null
fi
cat benchmarks/results/gpu_run_summary.txt 2>/dev/null
exit "$rc"
