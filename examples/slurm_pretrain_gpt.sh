#!/usr/bin/env bash
# Multi-node pretraining under Slurm: one torchrun per node, which starts that node's ranks;
# the nodes meet at a rendezvous on the allocation's first node.
#
#   sbatch examples/slurm_pretrain_gpt.sh [more pretrain_gpt.py flags, which override these]
#
# Run sbatch from the repository root (Slurm runs a copy of this script from its spool
# directory, so the script finds the code through SLURM_SUBMIT_DIR). The layout is what
# `python tools/plan_parallelism.py --model llama-8b --gpu H100 --num-gpus 16 --global-batch-size 512`
# ranks first for two nodes of 8 H100: cp 4 x pp 4, two chunks per rank under the zero-bubble
# V schedule (ZB-V), dp 1, the distributed optimizer (sharding over the cp ranks), micro batch 4.
# It writes TensorBoard events, which needs the tensorboard extra: pip install -e ".[tensorboard]".
#
#SBATCH --job-name=megatron-lite
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/llama-8b}
# PRECISION=fp32 trains in fp32, for a machine without bf16 (a CPU test run).
PRECISION_ARGS=(--bf16)
if [[ "${PRECISION:-bf16}" == fp32 ]]; then PRECISION_ARGS=(); fi

# --kill-on-bad-exit: one node failing stops the others instead of leaving them waiting on it.
srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
    pretrain_gpt.py \
    --model llama-8b "${PRECISION_ARGS[@]}" \
    --cp 4 --pp 4 --vpp 2 --pipeline-schedule zbv --use-distributed-optimizer \
    --micro-batch-size 4 --global-batch-size 512 \
    --train-iters 10000 --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 500 --lr-decay-style cosine \
    --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 \
    --save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" --save-interval 500 --async-save \
    --log-interval 10 --eval-interval 500 --tensorboard-dir "$CHECKPOINT_DIR/tensorboard" \
    "$@"
