#!/usr/bin/env bash
# CUDA checks of training, for a machine with a GPU: lmfleet train vs a hand-written loop (bf16,
# compile) for the small model and a ~1B model, and a torchrun + NCCL + FSDP run with a restart.
# Usage: OUT=dir bash benchmarks/gpu_train_check.sh
set -uo pipefail
OUT=${OUT:-runs/gpu_train_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY benchmarks/train_throughput.py --flavor small --seq-len 1024 --micro-batch 16 --steps 15 --warmup 5 \
    --precision bf16 --compile --skip-multiproc --json "$OUT/train_small_bf16.json"
$PY benchmarks/train_throughput.py --flavor small --seq-len 2048 --micro-batch 8 --steps 12 --warmup 5 \
    --model-set hidden_size=2048 --model-set num_hidden_layers=18 --model-set num_attention_heads=16 \
    --model-set num_key_value_heads=8 --model-set intermediate_size=5632 --model-set max_position_embeddings=2048 \
    --precision bf16 --compile --skip-multiproc --json "$OUT/train_1b_bf16.json"
$PY -m lmfleet.cli data prepare --source stdlib --out /tmp/gt_corpus --vocab-size 1024 > /dev/null
LMFLEET_FAULT_STEP=7 $PY -m lmfleet.cli train configs/debug.toml --data /tmp/gt_corpus --out /tmp/gt_run \
    --nproc 1 --max-restarts 1 --strategy fsdp --steps 12 --checkpoint-every 5 --set train.precision=bf16 2>&1 \
    | grep -vE "^step" | tail -4
$PY -c "import json; r=[json.loads(l) for l in open('/tmp/gt_run/metrics.jsonl')]; print(r[-2]); print(r[-1])"
