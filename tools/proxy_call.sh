#!/usr/bin/env bash
# One call of the GPU proxy experiment on a lent machine (docs/experiment.md), from the repository root:
#   bash tools/proxy_call.sh [train.pipeline arguments, e.g. --until pretrain --require-full-beyond 0.5]
# Installs the carried wheels (.whl), runs train.pipeline on configs/proxy_h200.yaml under `timeout $LIMIT`
# (default 570 s), appends its output to runs/proxy_h200.log and brings back, under $OUT (at most 8 files):
# the filtered log, and report.md, pipeline.json, headline.md, calibration.md, alpha.png, eval.md and the
# evaluation plots (one tar) where they exist; before report.md exists, each model evaluated so far (eval/<name>/:
# tables, cases, plots) as evals.tar instead of the plots.
# Env: PACK=1 packs the pretrained model into $OUT/pack (tools/pack_params.py) once it exists, before and after
# the pipeline, and then brings back only the log beside it; INIT=1 unpacks the carried .pack/ into
# runs/proxy_init (first call) and starts the pipeline from it (--init), skipping pretraining.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=runs/jax_cache || exit 9
OUT=${OUT:-/tmp/out}; mkdir -p runs "$OUT"
RUN=runs/proxy_h200; LOG=runs/proxy_h200.log; MODEL=$RUN/pretrain/stage-3/model
NOISE='slow_operation_alarm|Constant folding|This isn.t necessarily|If you.d like to file|%sort|bfc_allocator|Current allocation|TF_GPU_ALLOCATOR'
pack() {
  if [ -n "${PACK:-}" ] && [ -f $MODEL/loza_model.json ] && [ ! -f "$OUT/pack/manifest.json" ]; then
    python3 tools/pack_params.py pack $MODEL "$OUT/pack" 2>&1 | grep -v Warning | tail -2
  fi
}
pack
args=("$@")
if [ -n "${INIT:-}" ]; then
  [ -f runs/proxy_init/loza_model.json ] || python3 tools/pack_params.py unpack .pack runs/proxy_init || exit 8
  args=(--init runs/proxy_init "${args[@]}")
fi
echo "=== call $(date -u +%FT%TZ) args: ${args[*]}" >> $LOG
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> $LOG
# the live log goes to $OUT too, so a call the machine's own limit stops still brings it back
timeout ${LIMIT:-570} python3 -m train.pipeline --config configs/proxy_h200.yaml "${args[@]}" 2>&1 | tee -a $LOG > "$OUT/raw.log"
rc=${PIPESTATUS[0]}
echo "=== rc $rc $(date -u +%FT%TZ)" >> $LOG
pack
grep -Ev "$NOISE" $LOG | tr '\r' '\n' | grep -v '^LoZA pipeline' > "$OUT/proxy_h200.log" && rm -f "$OUT/raw.log"
if [ ! -f "$OUT/pack/manifest.json" ]; then
  for f in $RUN/report.md $RUN/pipeline.json $RUN/headline.md $RUN/calibrate/calibration.md $RUN/calibrate/alpha.png \
           $RUN/eval/eval.md; do
    [ -f "$f" ] && cp "$f" "$OUT/"
  done
  if [ -f $RUN/report.md ]; then
    ls $RUN/eval/*.png >/dev/null 2>&1 && tar -cf "$OUT/eval-plots.tar" -C $RUN/eval $(cd $RUN/eval && ls *.png)
  elif ls $RUN/eval/*/eval.json >/dev/null 2>&1; then   # each model evaluated so far: its tables, cases and plots
    tar -cf "$OUT/evals.tar" -C $RUN $(cd $RUN && ls eval/*/eval.md eval/*/eval.json eval/*/*.png 2>/dev/null)
  fi
fi
echo "done: $(ls $RUN/done 2>/dev/null | sed 's/\.json//' | tr '\n' ' ')"
tail -25 "$OUT/proxy_h200.log"
echo "rc $rc"
