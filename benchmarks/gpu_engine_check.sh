#!/usr/bin/env bash
# CUDA checks of the engine: CUDA-graph decode vs eager (tokens and speed); offline throughput at
# 256 concurrent requests vs HF static batching and batch-1 decode vs the memory-bandwidth bound,
# for the small model and a ~1B model (bf16).
# Usage: OUT=dir bash benchmarks/gpu_engine_check.sh
set -uo pipefail
OUT=${OUT:-runs/gpu_engine_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
timeout 150 $PY benchmarks/cuda_graphs_check.py --flavor small --dtype fp32 --num-prompts 256 \
    --json "$OUT/cuda_graphs_small_fp32.json"
timeout 120 $PY benchmarks/cuda_graphs_check.py --flavor small --dtype bf16 --num-prompts 256 \
    --json "$OUT/cuda_graphs_small_bf16.json"
timeout 160 $PY benchmarks/engine_vs_hf.py --flavor small --dtype bf16 --num-prompts 256 --input-len 64:512 \
    --output-len 64:256 --hf-batches 64,256 --decode-tokens 128 --json "$OUT/engine_small_bf16.json"
timeout 160 $PY benchmarks/engine_vs_hf.py --flavor small --dtype bf16 --num-prompts 256 --input-len 64:512 \
    --output-len 64:256 --hf-batches 64,256 --decode-tokens 128 \
    --model-set hidden_size=2048 --model-set num_hidden_layers=18 --model-set num_attention_heads=16 \
    --model-set num_key_value_heads=8 --model-set intermediate_size=5632 --json "$OUT/engine_1b_bf16.json"
