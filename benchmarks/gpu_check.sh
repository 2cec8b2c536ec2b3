#!/usr/bin/env bash
# One GPU session: install carried wheels (if any), then run the given stages in order.
# Usage: bash benchmarks/gpu_check.sh STAGES OUTDIR
#   STAGES: comma list of small (GPU sweep tests), large (real-size GPU tests), tune, mtune (Mosaic
#   forward vs Triton and tokamax), btune (backward choices and kernels), ncu (profile of one SSA
#   fwd+bwd, PROFILE_ARGS), kernels (duration of every kernel of one SSA fwd+bwd, PROFILE_ARGS),
#   bench, bench-quick, serve (the GPU tests of generation and the prefix kernel), compile (seconds to compile
#   the proxy's training step: default impl, attention.impl=xla, XLA autotuning off), prefill1m (LoZA chunked
#   prefill of 1M tokens in 128K chunks, benchmarks.e2e), context (benchmarks.context_gpu: the shard_map path's cost
#   at context 1, then the longest trainable LoZA row among FIT_LENS), sweep-errors (benchmarks.sweep_errors: every
#   output of the Mosaic sweep cases through each backward choice)
#   Env: *_S per-stage timeouts, LARGE_K pytest -k filter, BENCH_ARGS, TUNE_ARGS, PROFILE_ARGS,
#   NCU_FILTER (kernel-name regex), NCU_LAUNCHES, SWEEP_ARGS, COST_TYPES, FIT_LENS.
set -o pipefail
STAGES=${1:-small,large,bench}; OUT=${2:-${OUT:-/tmp/out}}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.:tests
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$OUT/smi.txt"
PYTEST="python3 -m pytest -m gpu tests/test_kernels_gpu.py -q -s -x -p no:cacheprovider"
for stage in ${STAGES//,/ }; do
  case $stage in
    small) timeout ${SMALL_S:-240} $PYTEST -k "sweep or fp32" 2>&1 | tee "$OUT/gpu_tests_small.log" | grep -E "passed|failed|rror|: o " ;;
    large) timeout ${LARGE_S:-240} $PYTEST -k "${LARGE_K:-real_size}" 2>&1 | tee "$OUT/gpu_tests_large.log" | grep -E "passed|failed|rror|: o " ;;
    tune) timeout ${TUNE_S:-200} python3 -m benchmarks.attention_tune ${TUNE_ARGS} 2>&1 | tee "$OUT/tune.log" | tail -${TUNE_TAIL:-60} ;;
    mtune) timeout ${MTUNE_S:-200} python3 -m benchmarks.mosaic_tune ${MTUNE_ARGS} 2>&1 | tee "$OUT/mtune.log" | tail -${MTUNE_TAIL:-40} ;;
    btune) timeout ${BTUNE_S:-240} python3 -m benchmarks.mosaic_tune --backward ${BTUNE_ARGS} 2>&1 | tee "$OUT/btune.log" | tail -20 ;;
    ncu) timeout ${NCU_S:-240} ncu --clock-control none --target-processes all --launch-count ${NCU_LAUNCHES:-40} \
           ${NCU_FILTER:+-k regex:$NCU_FILTER} --section SpeedOfLight --section ComputeWorkloadAnalysis \
           --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats --section WarpStateStats \
           python3 -m benchmarks.profile_ssa ${PROFILE_ARGS} > "$OUT/ncu.txt" 2>&1; tail -3 "$OUT/ncu.txt" ;;
    kernels) timeout ${KERNELS_S:-240} ncu --clock-control none --target-processes all --metrics gpu__time_duration.sum \
           --csv python3 -m benchmarks.profile_ssa ${PROFILE_ARGS} > "$OUT/kernels.csv" 2>&1
             python3 -m benchmarks.kernel_times "$OUT/kernels.csv" | tee "$OUT/kernels.txt" ;;
    bench) timeout ${BENCH_S:-300} python3 -m benchmarks.attention --out "$OUT" ${BENCH_ARGS} 2>&1 | tee "$OUT/bench.log" | tail -${BENCH_TAIL:-40} ;;
    serve) timeout ${SERVE_S:-300} python3 -m pytest -m gpu tests/test_generate.py tests/test_prefix_kernel.py -q -s -x \
             -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests_serve.log" | grep -E "passed|failed|rror" ;;
    compile) { timeout 200 python3 -m benchmarks.compile_time
               timeout 200 python3 -m benchmarks.compile_time --set attention.impl=xla
               XLA_FLAGS=--xla_gpu_autotune_level=0 timeout 200 python3 -m benchmarks.compile_time
             } 2>&1 | grep '^{' | tee -a "$OUT/compile_time.jsonl" ;;
    prefill1m) timeout ${PREFILL_S:-420} python3 -m benchmarks.e2e --decode "" --prefill 1048576 --prefill-models loza \
             --prefill-chunk 131072 --train "" --reps 1 --out "$OUT" 2>&1 | tee "$OUT/prefill1m.log" | tail -20 ;;
    context) timeout ${CONTEXT_S:-420} python3 -m benchmarks.context_gpu --cost-types ${COST_TYPES:-loza,full} --out "$OUT" \
               2>&1 | tee "$OUT/context_cost.log" | grep '^|'
             timeout ${FIT_S:-300} python3 -m benchmarks.context_gpu --cost-types "" --fit ${FIT_LENS:-262144,524288} \
               --fit-types loza --run-fit --out "$OUT" 2>&1 | tee "$OUT/context_fit.log" | grep '^|' ;;
    sweep-errors) timeout ${SWEEP_S:-200} python3 -m benchmarks.sweep_errors ${SWEEP_ARGS} 2>&1 | tee "$OUT/sweep_errors.log" | grep -v Warn ;;
    bench-quick) timeout ${BENCH_S:-200} python3 -m benchmarks.attention --quick --out "$OUT" ${BENCH_ARGS} 2>&1 | tee "$OUT/bench.log" | tail -40 ;;
  esac
done
