#!/usr/bin/env bash
# The CUDA checks of the model layer, for a machine with a GPU: bf16/fp32 agreement and speed
# against transformers, the CLI on CUDA, and the CPU test suite under that machine's torch.
# Usage: OUT=dir bash benchmarks/gpu_check.sh   (writes JSON results and a log under $OUT)
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
PY=${PY:-python3}
nvidia-smi -L
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
$PY benchmarks/model_vs_hf.py --flavor small --device cuda --dtype bf16 --batch 8 --prompt-len 512 \
    --decode-tokens 128 --json "$OUT/small_cuda_bf16.json"
$PY benchmarks/model_vs_hf.py --flavor small --device cuda --dtype fp32 --batch 8 --prompt-len 512 \
    --decode-tokens 128 --json "$OUT/small_cuda_fp32.json"
$PY -m lmfleet.cli data prepare --source stdlib --out /tmp/gc_corpus --vocab-size 8192
$PY -m lmfleet.cli init /tmp/gc_model --tokenizer /tmp/gc_corpus --flavor tiny
$PY -m lmfleet.cli generate /tmp/gc_model "def main():" --device cuda --dtype bf16 --max-tokens 24 --seed 0 \
    --temperature 0.8
$PY -m pytest -q -x -p no:cacheprovider tests 2>&1 | tail -5
