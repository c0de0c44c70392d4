#!/usr/bin/env bash
# CUDA kernel checks + CUDA benchmark in one call (about 4-5 minutes on an H100).
#
#   bash benchmarks/run_gpu.sh
#
# Runs from the repository root with PYTHONPATH=src (no install needed). Steps, each guarded
# so one failure does not stop the others:
#   1. environment report (GPU, driver, versions)                 -> gpu_env.txt
#   2. in parallel: benchmarks/cuda_selfcheck.py (pytest-free), the benchmark's kernel
#      compilation (bench_cuda.py --warm-only) and tests/test_kernels_triton.py on CUDA in 4
#      pytest shards                               -> cuda_selfcheck.log, bench_warm_*.log,
#                                                     cuda_tests_*.log
#   3. benchmarks/bench_cuda.py (time budget BENCH_BUDGET s)       -> bench_<gpu>.{json,md,png}
# Everything goes to benchmarks/results/ and is copied to $OUT when that is set. A summary of
# every step is in benchmarks/results/gpu_run_summary.txt. Always exits 0.
set -u

cd "$(dirname "$0")/.." || exit 0
RES="benchmarks/results"
mkdir -p "$RES"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
TEST_TIMEOUT="${TEST_TIMEOUT:-120}"
BENCH_BUDGET="${BENCH_BUDGET:-110}"
START=$(date +%s)
SUMMARY="$RES/gpu_run_summary.txt"
: > "$SUMMARY"

note() { echo "[run_gpu +$(( $(date +%s) - START ))s] $*" | tee -a "$SUMMARY"; }
copy_out() {
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT" 2>/dev/null && cp -r "$RES"/. "$OUT"/ 2>/dev/null \
            && echo "[run_gpu] results copied to \$OUT"
    fi
}
trap copy_out EXIT

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    for candidate in python python3; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
            PY="$candidate"; break
        fi
    done
fi
if [ -z "$PY" ]; then
    note "FAIL: no python with torch found"
    exit 0
fi

# 1. environment ---------------------------------------------------------------------------
{
    date
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
        --format=csv 2>&1 || echo "nvidia-smi unavailable"
    "$PY" - <<'EOF' 2>&1
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("triton", "pytest", "numpy", "matplotlib", "segmentation_models_pytorch", "monai"):
    try:
        mod = __import__(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as exc:
        print(name, "not importable:", type(exc).__name__, exc)
import dynloss
from dynloss.kernels import resolve_backend, triton_available
print("dynloss", dynloss.__version__, "triton_available", triton_available())
if torch.cuda.is_available():
    print("auto backend on cuda ->", resolve_backend(torch.zeros(1, device="cuda"), "auto"))
EOF
    echo "vendored competitors (benchmarks/.vendor): $(cat benchmarks/.vendor/VERSIONS 2>/dev/null | tr '\n' ' ' || true)"
} > "$RES/gpu_env.txt" 2>&1
note "environment: $(grep -E '^(torch|cuda available|triton|pytest|auto|vendored)' "$RES/gpu_env.txt" | tr '\n' ';')"

# 2. correctness on CUDA (parallel: Triton compilation is CPU-bound) ------------------------
pids=(); names=()
timeout "$TEST_TIMEOUT" "$PY" benchmarks/cuda_selfcheck.py > "$RES/cuda_selfcheck.log" 2>&1 &
pids+=($!); names+=("selfcheck")
# compile the benchmark's kernel variants now (Triton's disk cache), not in the timed part
for dt in float32 bfloat16; do
    timeout "$TEST_TIMEOUT" "$PY" benchmarks/bench_cuda.py --warm-only --dtypes "$dt" \
        > "$RES/bench_warm_$dt.log" 2>&1 &
    pids+=($!); names+=("bench-warm-$dt")
done
if "$PY" -c "import pytest" >/dev/null 2>&1; then
    # --noconftest: tests/conftest.py needs hypothesis, which the GPU machine may lack.
    # 4 contiguous shards of the collected test ids (tests of one function stay together, so
    # each kernel variant is compiled by one process; Triton's disk cache serves the rest)
    "$PY" -m pytest --collect-only -q -p no:cacheprovider --noconftest tests/test_kernels_triton.py \
        2>/dev/null | grep "::" > "$RES/cuda_test_ids.txt"
    total=$(wc -l < "$RES/cuda_test_ids.txt")
    note "pytest: $total CUDA test cases in 4 shards"
    per=$(( (total + 3) / 4 ))
    for i in 0 1 2 3; do
        mapfile -t ids < <(awk -v lo=$(( i * per )) -v hi=$(( (i + 1) * per )) \
            'NR > lo && NR <= hi' "$RES/cuda_test_ids.txt")
        [ "${#ids[@]}" -eq 0 ] && continue
        timeout "$TEST_TIMEOUT" "$PY" -m pytest -v --tb=short -rfE -p no:cacheprovider --noconftest \
            "${ids[@]}" > "$RES/cuda_tests_$i.log" 2>&1 &
        pids+=($!); names+=("pytest-$i")
    done
else
    note "pytest not importable: only benchmarks/cuda_selfcheck.py checks correctness"
fi
for i in "${!pids[@]}"; do
    wait "${pids[$i]}"; rc=$?
    case "${names[$i]}" in
        selfcheck) log="$RES/cuda_selfcheck.log" ;;
        bench-warm-*) log="$RES/bench_warm_${names[$i]#bench-warm-}.log" ;;
        *) log="$RES/cuda_tests_${names[$i]#pytest-}.log" ;;
    esac
    verdict="ok"
    [ "$rc" -eq 124 ] && verdict="TIMEOUT after ${TEST_TIMEOUT}s (partial log)"
    [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && verdict="FAIL (rc=$rc)"
    note "${names[$i]}: $verdict -- $(tail -n 1 "$log" 2>/dev/null)"
    grep -E "^(FAIL|FAILED|ERROR)" "$log" 2>/dev/null | head -n 20 >> "$SUMMARY"
done

# 3. benchmark ------------------------------------------------------------------------------
timeout $(( BENCH_BUDGET + 45 )) "$PY" benchmarks/bench_cuda.py --budget "$BENCH_BUDGET" \
    --out "$RES" > "$RES/bench_cuda.log" 2>&1
rc=$?
if [ "$rc" -eq 0 ]; then
    note "benchmark: ok -- $(tail -n 1 "$RES/bench_cuda.log")"
else
    note "benchmark: FAIL (rc=$rc) -- $(tail -n 3 "$RES/bench_cuda.log" | tr '\n' ' ')"
fi
grep -E "NOTE|Error|error" "$RES/bench_cuda.log" 2>/dev/null | head -n 15 >> "$SUMMARY"
note "done in $(( $(date +%s) - START ))s"
exit 0
