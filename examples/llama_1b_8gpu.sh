#!/usr/bin/env bash
# llama-1b (TinyLlama-1.1B's shape) on one node of 8 GPUs, in the layout the planner ranks first:
#
#   python tools/plan_parallelism.py --model llama-1b --gpu H100 --num-gpus 8 --global-batch-size 256
#
# puts it at dp 8 with ZeRO-3 (--data-parallel-sharding-strategy optim_grads_params), micro batch 8,
# no recomputation: 1.1B parameters need no model parallelism, and at micro batch 8 activations
# dominate memory; the three sharding strategies predict step times within 0.5 % of each other,
# ZeRO-3 the lowest peak memory. Run from anywhere:
#
#   bash examples/llama_1b_8gpu.sh [more pretrain_gpt.py flags, which override these]
#
# Without DATA_PATH it trains on the built-in corpus with the byte tokenizer; set DATA_PATH (a
# prefix tools/preprocess_data.py wrote) for your data, and TOKENIZER_MODEL (the Hugging Face
# tokenizer it used) unless that was the byte tokenizer. It writes TensorBoard events, which
# needs the tensorboard extra: pip install -e ".[tensorboard]".
set -euo pipefail
cd "$(dirname "$0")/.."

NPROC_PER_NODE=${NPROC_PER_NODE:-8}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/llama-1b}
# PRECISION=fp32 trains in fp32, for a machine without bf16 (a CPU test run).
PRECISION_ARGS=(--bf16)
if [[ "${PRECISION:-bf16}" == fp32 ]]; then PRECISION_ARGS=(); fi
DATA_ARGS=()
if [[ -n "${DATA_PATH:-}" ]]; then DATA_ARGS=(--data-path "$DATA_PATH"); fi
if [[ -n "${TOKENIZER_MODEL:-}" ]]; then
    DATA_ARGS+=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL")
fi

torchrun --standalone --nproc-per-node "$NPROC_PER_NODE" pretrain_gpt.py \
    --model llama-1b "${PRECISION_ARGS[@]}" \
    --data-parallel-sharding-strategy optim_grads_params --micro-batch-size 8 --global-batch-size 256 \
    --train-iters 20000 --lr 4e-4 --min-lr 4e-5 --lr-warmup-iters 2000 --lr-decay-style cosine \
    --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 \
    "${DATA_ARGS[@]}" \
    --save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" --save-interval 1000 --async-save \
    --log-interval 10 --eval-interval 1000 --tensorboard-dir "$CHECKPOINT_DIR/tensorboard" \
    "$@"
