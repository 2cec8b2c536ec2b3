#!/usr/bin/env bash
# One GPU session: install carried wheels (if any), run the GPU kernel tests, tune and benchmark.
# Usage: bash benchmarks/gpu_check.sh STAGES OUTDIR   (STAGES: comma list of small,large,tune,bench,bench-quick)
set -o pipefail
STAGES=${1:-small,large,bench}; OUT=${2:-${OUT:-/tmp/out}}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.:tests
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$OUT/smi.txt"
has() { [[ ",$STAGES," == *",$1,"* ]]; }
if has small; then timeout ${SMALL_S:-240} python3 -m pytest -m gpu tests/test_kernels_gpu.py -q -s -x -p no:cacheprovider \
  -k "sweep or fp32" 2>&1 | tee "$OUT/gpu_tests_small.log" | grep -E "passed|failed|error|Error|rel err|: o " ; fi
if has large; then timeout ${LARGE_S:-240} python3 -m pytest -m gpu tests/test_kernels_gpu.py -q -s -x -p no:cacheprovider \
  -k "real_size" 2>&1 | tee "$OUT/gpu_tests_large.log" | grep -E "passed|failed|error|Error|rel err|: o " ; fi
if has tune; then timeout ${TUNE_S:-200} python3 -m benchmarks.attention_tune ${TUNE_ARGS} 2>&1 | tee "$OUT/tune.log" | tail -${TUNE_TAIL:-60}; fi
if has bench; then timeout ${BENCH_S:-300} python3 -m benchmarks.attention --out "$OUT" ${BENCH_ARGS} 2>&1 | tee "$OUT/bench.log" | tail -40; fi
if has bench-quick; then timeout ${BENCH_S:-200} python3 -m benchmarks.attention --quick --out "$OUT" ${BENCH_ARGS} 2>&1 | tee "$OUT/bench.log" | tail -40; fi
