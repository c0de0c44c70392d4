#!/usr/bin/env bash
# The CUDA checks and the CUDA benchmark (called by benchmarks/run_all_gpu.sh, which first
# checks the machine and installs the carried wheels; run that one).
#
#   bash benchmarks/run_gpu.sh
#
# Runs from the repository root with PYTHONPATH=src (no install). Steps, each guarded so one
# failure does not stop the others, everything written to benchmarks/results/:
#   1. environment report (GPU, driver, versions)                      -> gpu_env.txt
#   2. in parallel (Triton compilation is CPU-bound, the GPU is barely used):
#      - the CUDA tests: tests/test_kernels_triton.py (values, gradients, NaN semantics, no
#        host sync), tests/test_triton_launches.py (launch counts), tests/test_triton_graphs.py
#        (CUDA graph capture and replay, torch.compile fullgraph and reduce-overhead, opcheck),
#        tests/test_triton_reduction_none.py (per-element losses against the reference),
#        with pytest-xdist when present, else in 4 shards              -> cuda_tests*.log
#      - benchmarks/cuda_selfcheck.py (pytest-free: values, no host sync, capture, compile,
#        launches counted by the profiler)                              -> cuda_selfcheck.log
#      - the benchmark's kernel compilation (bench_cuda.py --warm-only) -> bench_warm.log
#   3. benchmarks/bench_cuda.py, alone on the GPU (budgets BENCH_BUDGET, COMPILE_BUDGET s)
#                                                   -> bench_<gpu>.{json,md,png}, bench_cuda.log
# A line per step goes to benchmarks/results/gpu_run_summary.txt. Exits 1 when a step failed.
set -u

cd "$(dirname "$0")/.." || exit 1
RES="benchmarks/results"
mkdir -p "$RES"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
TEST_TIMEOUT="${TEST_TIMEOUT:-180}"
BENCH_BUDGET="${BENCH_BUDGET:-110}"
COMPILE_BUDGET="${COMPILE_BUDGET:-50}"
START=$(date +%s)
SUMMARY="$RES/gpu_run_summary.txt"
: > "$SUMMARY"
FAILED=0

note() { echo "[run_gpu +$(( $(date +%s) - START ))s] $*" | tee -a "$SUMMARY"; }

PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch, triton; assert torch.cuda.is_available()" >/dev/null 2>&1; then
    note "FAIL: $PY cannot import torch and triton with a CUDA device"
    exit 1
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
for name in ("triton", "pytest", "xdist", "hypothesis", "numpy", "matplotlib",
             "segmentation_models_pytorch", "monai"):
    try:
        mod = __import__(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as exc:
        print(name, "not importable:", type(exc).__name__, exc)
import dynloss
from dynloss.kernels import resolve_backend, triton_available
print("dynloss", dynloss.__version__, "from", dynloss.__file__, "triton_available",
      triton_available())
print("auto backend on cuda ->", resolve_backend(torch.zeros(1, device="cuda"), "auto"))
EOF
} > "$RES/gpu_env.txt" 2>&1
note "environment: $(grep -E '^(torch|cuda available|triton|pytest|xdist|auto|segmentation|monai)' "$RES/gpu_env.txt" | tr '\n' ';')"

# 2. correctness, launches, graphs (parallel) ----------------------------------------------
TESTS="tests/test_kernels_triton.py tests/test_triton_launches.py tests/test_triton_graphs.py tests/test_triton_reduction_none.py"
CONFTEST=""
"$PY" -c "import hypothesis" >/dev/null 2>&1 || CONFTEST="--noconftest"
pids=(); names=(); logs=()
timeout "$TEST_TIMEOUT" "$PY" benchmarks/cuda_selfcheck.py > "$RES/cuda_selfcheck.log" 2>&1 &
pids+=($!); names+=("selfcheck"); logs+=("$RES/cuda_selfcheck.log")
timeout "$TEST_TIMEOUT" "$PY" benchmarks/bench_cuda.py --warm-only > "$RES/bench_warm.log" 2>&1 &
pids+=($!); names+=("bench-warm"); logs+=("$RES/bench_warm.log")
if "$PY" -c "import xdist" >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    timeout "$TEST_TIMEOUT" "$PY" -m pytest -n 6 -q -rfE --tb=short -p no:cacheprovider \
        $CONFTEST $TESTS > "$RES/cuda_tests.log" 2>&1 &
    pids+=($!); names+=("pytest-xdist"); logs+=("$RES/cuda_tests.log")
else
    # shellcheck disable=SC2086
    "$PY" -m pytest --collect-only -q -p no:cacheprovider $CONFTEST $TESTS \
        > "$RES/cuda_collect.log" 2>&1
    collect_rc=$?
    grep "::" "$RES/cuda_collect.log" > "$RES/cuda_test_ids.txt"
    total=$(wc -l < "$RES/cuda_test_ids.txt")
    per=$(( (total + 3) / 4 ))
    note "pytest: $total CUDA test cases in 4 shards (no pytest-xdist)"
    if [ "$collect_rc" -ne 0 ] || [ "$total" -eq 0 ]; then  # a partial run must not pass
        FAILED=1
        note "pytest collection: FAIL (rc=$collect_rc, $total cases) -- $(grep -E "ERROR|Error" \
            "$RES/cuda_collect.log" | head -n 3 | tr '\n' ' ')"
    fi
    for i in 0 1 2 3; do
        mapfile -t ids < <(awk -v lo=$(( i * per )) -v hi=$(( (i + 1) * per )) \
            'NR > lo && NR <= hi' "$RES/cuda_test_ids.txt")
        [ "${#ids[@]}" -eq 0 ] && continue
        # shellcheck disable=SC2086
        timeout "$TEST_TIMEOUT" "$PY" -m pytest -q -rfE --tb=short -p no:cacheprovider \
            $CONFTEST "${ids[@]}" > "$RES/cuda_tests_$i.log" 2>&1 &
        pids+=($!); names+=("pytest-$i"); logs+=("$RES/cuda_tests_$i.log")
    done
fi
for i in "${!pids[@]}"; do
    wait "${pids[$i]}"; rc=$?
    verdict="ok"
    [ "$rc" -eq 124 ] && verdict="TIMEOUT after ${TEST_TIMEOUT}s (partial log)"
    [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && verdict="FAIL (rc=$rc)"
    [ "$rc" -ne 0 ] && FAILED=1
    note "${names[$i]}: $verdict -- $(tail -n 1 "${logs[$i]}" 2>/dev/null)"
    grep -E "^(FAIL|FAILED|ERROR)" "${logs[$i]}" 2>/dev/null | head -n 25 >> "$SUMMARY"
done

# 3. benchmark (alone on the GPU) ----------------------------------------------------------
timeout $(( BENCH_BUDGET + COMPILE_BUDGET + 30 )) "$PY" benchmarks/bench_cuda.py \
    --budget "$BENCH_BUDGET" --compile-budget "$COMPILE_BUDGET" --out "$RES" \
    > "$RES/bench_cuda.log" 2>&1
rc=$?
if [ "$rc" -eq 0 ]; then
    note "benchmark: ok -- $(tail -n 1 "$RES/bench_cuda.log")"
elif [ "$rc" -eq 3 ]; then  # stopped by its budget: a partial result, not a complete one
    FAILED=1
    note "benchmark: INCOMPLETE (rc=3) -- $(grep -m 1 'incomplete' "$RES/bench_cuda.log")"
else
    FAILED=1
    note "benchmark: FAIL (rc=$rc) -- $(tail -n 3 "$RES/bench_cuda.log" | tr '\n' ' ')"
fi
grep -E "NOTE|Error|error" "$RES/bench_cuda.log" 2>/dev/null | head -n 15 >> "$SUMMARY"
note "done in $(( $(date +%s) - START ))s (failed steps: $FAILED)"
exit "$FAILED"
