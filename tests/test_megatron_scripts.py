"""Megatron-LM's own launch scripts run here unchanged: the flag arrays of
examples/gpt3/train_gpt3_175b_distributed.sh, examples/llama/train_llama3_8b_h200_bf16.sh (its
--mock-data branch) and examples/mixtral/train_mixtral_8x7b_distributed.sh, as the scripts write them, with sizes
shrunk and paths replaced, train to their last iteration under torchrun at world 2, and so does DeepSeek-V3's
Megatron-Core recipe (multi-latent attention, group-limited sigmoid routing, 3 dense layers first) on mock data;
examples/megatron_fsdp's DeepSeek-V3
script (Megatron-FSDP, MTP, per-token loss, selective recompute of MLA's up-projections) and Qwen3-30B-A3B's recipe
train in process; at the scripts' own sizes they (but DeepSeek-V3's recipe, whose 61 layers over pp 8 need uneven
stages) pass the dry run for their world; and docs/megatron_compat.md names every flag they use."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from tokenizers import pre_tokenizers

import pretrain_gpt
from helpers.commands import ROOT, run_command
from helpers.tokenizers import write_corpus
from tools import preprocess_data, train_tokenizer

# wandb is an optional package: its flags are stripped where it is not installed.
WANDB_FLAGS = {"--wandb-project": 1, "--wandb-exp-name": 1, "--wandb-save-dir": 1}


def gpt3_175b(data: dict[str, str], n: Callable) -> list[list[str]]:
    """train_gpt3_175b_distributed.sh's arrays; n(the script's size, a tiny one)."""
    gpt_model_args = [
        f"--num-layers {n(96, 2)}",
        f"--hidden-size {n(12288, 32)}",
        f"--num-attention-heads {n(96, 4)}",
        f"--seq-length {n(2048, 32)}",
        f"--max-position-embeddings {n(2048, 32)}",
        "--attention-backend auto",
    ]
    training_args = [
        "--micro-batch-size 1",
        f"--global-batch-size {n(1536, 4)}",
        f"--rampup-batch-size {n('16 16 5859375', '2 2 4')}",
        f"--train-iters {n(500000, 4)}",
        "--weight-decay 0.1",
        "--adam-beta1 0.9",
        "--adam-beta2 0.95",
        "--init-method-std 0.006",
        "--clip-grad 1.0",
        "--fp16",
        "--lr 6.0e-5",
        "--lr-decay-style cosine",
        "--min-lr 6.0e-6",
        "--lr-warmup-fraction .001",
        f"--lr-decay-iters {n(430000, 3)}",
    ]
    model_parallel_args = [
        f"--tensor-model-parallel-size {n(8, 1)}",
        f"--pipeline-model-parallel-size {n(16, 2)}",
    ]
    data_args = [
        f"--data-path {data['data_path']}",
        f"--vocab-file {data['vocab_file']}",
        f"--merge-file {data['merge_file']}",
        "--split 949,50,1",
    ]
    eval_and_logging_args = [
        f"--log-interval {n(100, 1)}",
        f"--save-interval {n(10000, 2)}",
        f"--eval-interval {n(1000, 2)}",
        f"--save {data['checkpoint']}",
        f"--load {data['checkpoint']}",
        f"--eval-iters {n(10, 1)}",
        f"--tensorboard-dir {data['tensorboard']}",
    ]
    return [gpt_model_args, training_args, model_parallel_args, data_args, eval_and_logging_args]


def llama3_8b_h200_bf16(data: dict[str, str], n: Callable) -> list[list[str]]:
    """train_llama3_8b_h200_bf16.sh's arrays, DATA_ARGS_LIST of its mock-data branch."""
    model_args = [
        "--use-mcore-models",
        f"--num-layers {n(32, 2)}",
        f"--hidden-size {n(4096, 32)}",
        f"--ffn-hidden-size {n(14336, 64)}",
        f"--num-attention-heads {n(32, 4)}",
        "--group-query-attention",
        f"--num-query-groups {n(8, 2)}",
        f"--kv-channels {n(128, 8)}",
        f"--seq-length {n(8192, 16)}",
        f"--max-position-embeddings {n(8192, 16)}",
        "--position-embedding-type rope",
        "--rotary-base 1000000",
        "--rotary-percent 1.0",
        "--attention-dropout 0.0",
        "--hidden-dropout 0.0",
        "--swiglu",
        "--init-method-std 0.0134",
        "--attention-backend fused",
        "--apply-layernorm-1p",
        "--untie-embeddings-and-output-weights",
        "--disable-bias-linear",
    ]
    training_args = [
        "--micro-batch-size 1",
        f"--global-batch-size {n(128, 4)}",
        f"--train-samples {n(1953125000, 16)}",
        f"--lr-decay-samples {n(1949218748, 12)}",
        f"--lr-warmup-samples {n(3906252, 4)}",
        "--lr 0.00015",
        "--min-lr 0.00001",
        "--decoupled-lr 5.0e-4",
        "--decoupled-min-lr 4.5e-5",
        "--lr-decay-style cosine",
        "--clip-grad 1.0",
        "--weight-decay 0.1",
        "--adam-beta1 0.9",
        "--adam-beta2 0.95",
        "--bf16",
        "--grad-reduce-in-bf16",
        "--cross-entropy-loss-fusion",
        "--calculate-per-token-loss",
        "--manual-gc",
        "--empty-unused-memory-level 1",
        "--exit-duration-in-mins 235",
        # DDP_ARGS, which the script appends to TRAINING_ARGS
        "--use-distributed-optimizer",
        "--overlap-grad-reduce",
        "--overlap-param-gather",
    ]
    model_parallel_args = [
        "--tensor-model-parallel-size 1",
        "--context-parallel-size 1",
        "--sequence-parallel",
    ]
    data_args_list = [  # each element one quoted string in the script, split by the shell when expanded
        "--mock-data",
        "--tokenizer-type NullTokenizer",
        f"--vocab-size {n(128256, 500)}",
        f"--data-cache-path {data['cache']}",
        "--tiktoken-pattern v2",
        "--split '99,1,0'",
        "--no-create-attention-mask-in-dataloader",
        "--no-mmap-bin-files",
        "--num-workers 1",
    ]
    eval_and_logging_args = [
        "--log-interval 1",
        f"--save-interval {n(1000, 2)}",
        "--log-throughput",
        "--profile",
        "--profile-step-start 4",
        "--profile-step-end 6",
        "--ckpt-format torch_dist",
        "--distributed-timeout-minutes 60",
        f"--save {data['checkpoint']}",
        f"--load {data['checkpoint']}",
        f"--tensorboard-dir {data['tensorboard']}",
        "--wandb-project megatron-lm-training",
        "--wandb-exp-name llama3x-8b-bf16-tp1",
        f"--wandb-save-dir {data['checkpoint']}/wandb",
        "--log-params-norm",
        "--log-num-zeros-in-grad",
        "--log-timers-to-tensorboard",
    ]
    return [model_args, training_args, model_parallel_args, data_args_list, eval_and_logging_args]


def mixtral_8x7b(data: dict[str, str], n: Callable) -> list[list[str]]:
    """train_mixtral_8x7b_distributed.sh's arrays."""
    model_args = ["--use-mcore-models", "--disable-bias-linear", f"--seq-length {n(4096, 16)}",
                  f"--max-position-embeddings {n(32768, 64)}", f"--num-layers {n(32, 2)}",
                  f"--hidden-size {n(4096, 32)}", f"--ffn-hidden-size {n(14336, 64)}",
                  f"--num-attention-heads {n(32, 4)}", "--init-method-std 0.01", "--attention-dropout 0.0",
                  "--hidden-dropout 0.0", "--normalization RMSNorm", "--position-embedding-type rope", "--swiglu",
                  "--untie-embeddings-and-output-weights", "--group-query-attention",
                  f"--num-query-groups {n(8, 2)}", "--no-masked-softmax-fusion", "--no-position-embedding",
                  "--rotary-base 1000000"]
    moe_args = ["--num-experts 8", "--moe-router-topk 2", "--moe-router-load-balancing-type aux_loss",
                "--moe-aux-loss-coeff 1e-2", "--moe-grouped-gemm", "--moe-token-dispatcher-type alltoall",
                "--overlap-param-gather", "--overlap-grad-reduce"]
    data_args = ["--tokenizer-type Llama2Tokenizer", f"--tokenizer-model {data['tokenizer_model']}",
                 f"--data-path {data['data_path']}",
                 # The test corpus has 150 documents, too few for 8 in 100,000 to be any: ratios for its size.
                 f"--split {n('99990,8,2', '90,8,2')}"]
    training_args = ["--micro-batch-size 1", f"--global-batch-size {n(256, 4)}", "--lr 1e-4",
                     f"--train-iters {n(500000, 4)}", f"--lr-decay-iters {n(320000, 4)}", "--lr-decay-style cosine",
                     "--min-lr 1.0e-5", "--weight-decay 0.1", f"--lr-warmup-iters {n(500, 1)}", "--clip-grad 1.0",
                     "--bf16"]
    model_parallel_args = ["--tensor-model-parallel-size 1", f"--pipeline-model-parallel-size {n(4, 1)}",
                           f"--expert-model-parallel-size {n(8, 2)}", "--use-distributed-optimizer",
                           "--sequence-parallel"]
    logging_args = ["--log-interval 1", f"--save-interval {n(10000, 4)}", f"--eval-interval {n(1000, 4)}",
                    f"--eval-iters {n(10, 1)}", f"--save {data['checkpoint']}", f"--load {data['checkpoint']}",
                    f"--tensorboard-dir {data['checkpoint']}/tensorboard", "--no-load-optim", "--no-load-rng"]
    return [model_args, moe_args, data_args, training_args, model_parallel_args, logging_args]


def deepseek_v3(data: dict[str, str], n: Callable) -> list[list[str]]:
    """DeepSeek-V3's MODEL_ARGS in NVIDIA's Megatron-MoE-ModelZoo (model_configs/benchmarking/DeepSeek-V3.yaml, the
    Megatron-Core recipe its best-practice scripts launch), as flags: `true` a switch, `false` left out; TP, PP, EP,
    CP, MBS, GBS, SEQ_LEN and the paths filled in; shrunk, its Hub tokenizer and corpus replaced by mock data."""
    distributed = ["--distributed-timeout-minutes 60", "--tensor-model-parallel-size 2",
                   f"--pipeline-model-parallel-size {n(8, 1)}", f"--expert-model-parallel-size {n(64, 2)}",
                   "--context-parallel-size 1", "--expert-tensor-parallel-size 1", "--use-distributed-optimizer",
                   "--overlap-grad-reduce", "--overlap-param-gather"]
    training = ["--use-mcore-models", "--sequence-parallel", "--use-flash-attn", "--disable-bias-linear",
                "--micro-batch-size 1", f"--global-batch-size {n(8192, 4)}", f"--train-samples {n(585937500, 16)}",
                "--exit-duration-in-mins 220", "--no-save-optim", "--no-check-for-nan-in-loss-and-grad",
                "--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl native", "--manual-gc",
                "--manual-gc-interval 10", "--transformer-impl transformer_engine"]
    data_args = [f"--seq-length {n(4096, 16)}", f"--data-cache-path {data['cache']}",
                 n("--tokenizer-type HuggingFaceTokenizer", "--tokenizer-type NullTokenizer --vocab-size 300"),
                 n(f"--tokenizer-model {data['tokenizer_model']}", "--mock-data"),
                 n(f"--data-path {data['data_path']}", ""), "--split 99,1,0", "--no-mmap-bin-files",
                 "--no-create-attention-mask-in-dataloader", f"--num-workers {n(6, 1)}"]
    network = [f"--num-layers {n(61, 4)}", f"--hidden-size {n(7168, 32)}", f"--ffn-hidden-size {n(18432, 64)}",
               f"--num-attention-heads {n(128, 4)}", f"--kv-channels {n(128, 8)}",
               f"--max-position-embeddings {n(4096, 16)}", "--position-embedding-type rope", "--rotary-base 10000",
               "--make-vocab-size-divisible-by 3232", "--normalization RMSNorm", "--norm-epsilon 1e-6", "--swiglu",
               "--untie-embeddings-and-output-weights", "--multi-latent-attention"]
    regularization = ["--attention-dropout 0.0", "--hidden-dropout 0.0", "--clip-grad 1.0", "--weight-decay 0.1",
                      "--qk-layernorm"]
    learning_rate = [f"--lr-decay-samples {n(584765624, 12)}", f"--lr-warmup-samples {n(1536000, 4)}",
                     "--lr-warmup-init 3.9e-7", "--lr 3.9e-6", "--min-lr 3.9e-7", "--lr-decay-style cosine",
                     "--adam-beta1 0.9", "--adam-beta2 0.95"]
    moe = [f"--num-experts {n(256, 8)}", f"--moe-layer-freq {n('([0]*3+[1]*58)', '([0]*1+[1]*3)')}",
           f"--moe-ffn-hidden-size {n(2048, 16)}", f"--moe-shared-expert-intermediate-size {n(2048, 16)}",
           "--moe-router-load-balancing-type seq_aux_loss", f"--moe-router-topk {n(8, 2)}", "--moe-grouped-gemm",
           "--moe-aux-loss-coeff 1e-4", f"--moe-router-group-topk {n(4, 2)}", f"--moe-router-num-groups {n(8, 4)}",
           "--moe-router-topk-scaling-factor 2.5", "--moe-router-score-function sigmoid",
           "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate 1e-3", "--moe-router-dtype fp32",
           "--moe-permute-fusion", "--moe-router-fusion"]
    mla = [f"--q-lora-rank {n(1536, 16)}", f"--kv-lora-rank {n(512, 8)}", f"--qk-head-dim {n(128, 8)}",
           f"--qk-pos-emb-head-dim {n(64, 4)}", f"--v-head-dim {n(128, 6)}", "--rotary-scaling-factor 40",
           "--mscale 1.0", "--mscale-all-dim 1.0"]
    rest = ["--eval-iters 32", "--eval-interval 200", "--no-load-optim", "--no-load-rng", "--auto-detect-ckpt-format",
            f"--load {data['checkpoint']}", f"--save {data['checkpoint']}", "--save-interval 500",
            "--dist-ckpt-strictness log_all", "--init-method-std 0.02", "--log-timers-to-tensorboard",
            "--log-memory-to-tensorboard", "--log-validation-ppl-to-tensorboard", "--log-throughput",
            "--log-interval 1", "--logging-level 40", f"--tensorboard-dir {data['tensorboard']}",
            "--wandb-project dsv3", "--wandb-exp-name DeepSeek-V3", "--bf16", "--enable-experimental"]
    return [distributed, training, data_args, network, regularization, learning_rate, moe, mla, rest]


def deepseek_v3_megatron_fsdp(data: dict[str, str], n: Callable) -> list[list[str]]:
    """examples/megatron_fsdp/sbatch_mfsdp_deepseek_v3.sh's PRETRAIN_ARGS with its defaults (TP 1, EP 8, MBS 4, GBS
    2048, USE_MEGATRON_FSDP=1, SHARDING_STRATEGY optim_grads_params, WANDB=1, PROFILE=0); its Hub tokenizer and
    corpus replaced by mock data."""
    pretrain = ["--distributed-timeout-minutes 60", "--tensor-model-parallel-size 1",
                f"--expert-model-parallel-size {n(8, 1)}", "--expert-tensor-parallel-size 1",
                "--context-parallel-size 1", "--use-distributed-optimizer", "--overlap-grad-reduce",
                "--overlap-param-gather", "--use-mcore-models", "--sequence-parallel", "--use-flash-attn",
                "--disable-bias-linear", f"--micro-batch-size {n(4, 1)}", f"--global-batch-size {n(2048, 2)}",
                f"--train-samples {n(585937500, 4)}", "--exit-duration-in-mins 220",
                "--no-check-for-nan-in-loss-and-grad", "--manual-gc", "--manual-gc-interval 10",
                "--recompute-granularity selective", "--recompute-modules mlp moe mla_up_proj layernorm",
                "--transformer-impl transformer_engine", f"--seq-length {n(4096, 16)}",
                f"--data-cache-path {data['cache']}", "--tokenizer-type NullTokenizer",
                f"--vocab-size {n(129280, 300)}", "--mock-data", "--split 99,1,0", "--no-mmap-bin-files",
                "--no-create-attention-mask-in-dataloader", f"--num-workers {n(6, 1)}", f"--num-layers {n(61, 3)}",
                f"--hidden-size {n(7168, 32)}", f"--ffn-hidden-size {n(18432, 64)}",
                f"--num-attention-heads {n(128, 4)}", f"--kv-channels {n(128, 8)}",
                f"--max-position-embeddings {n(4096, 16)}", "--position-embedding-type rope", "--rotary-base 10000",
                f"--make-vocab-size-divisible-by {n(3232, 8)}", "--normalization RMSNorm", "--norm-epsilon 1e-6",
                "--swiglu", "--untie-embeddings-and-output-weights", "--multi-latent-attention",
                "--attention-dropout 0.0", "--hidden-dropout 0.0", "--clip-grad 1.0", "--weight-decay 0.1",
                "--qk-layernorm", f"--lr-decay-samples {n(584765624, 4)}", f"--lr-warmup-samples {n(1536000, 2)}",
                "--lr-warmup-init 3.9e-7", "--lr 3.9e-6", "--min-lr 3.9e-7", "--lr-decay-style cosine",
                "--adam-beta1 0.9", "--adam-beta2 0.95", f"--num-experts {n(256, 8)}",
                f"--moe-layer-freq {n('[0]*3+[1]*58', '[0]*1+[1]*2')}", f"--moe-ffn-hidden-size {n(2048, 16)}",
                f"--moe-shared-expert-intermediate-size {n(2048, 16)}",
                "--moe-router-load-balancing-type seq_aux_loss", f"--moe-router-topk {n(8, 2)}",
                "--moe-token-dispatcher-type flex", "--moe-flex-dispatcher-backend hybridep",
                "--moe-router-pre-softmax", "--moe-grouped-gemm", "--moe-aux-loss-coeff 1e-4",
                f"--moe-router-group-topk {n(4, 2)}", f"--moe-router-num-groups {n(8, 4)}",
                "--moe-router-topk-scaling-factor 2.5", "--moe-router-score-function sigmoid",
                "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate 1e-3", "--moe-router-dtype fp32",
                "--moe-permute-fusion", "--moe-router-force-load-balancing", f"--q-lora-rank {n(1536, 16)}",
                f"--kv-lora-rank {n(512, 8)}", f"--qk-head-dim {n(128, 8)}", f"--qk-pos-emb-head-dim {n(64, 4)}",
                f"--v-head-dim {n(128, 6)}", "--rotary-scaling-factor 40", "--mscale 1.0", "--mscale-all-dim 1.0",
                "--mtp-num-layers 1", "--mtp-loss-scaling-factor 0.1", f"--eval-iters {n(32, 1)}",
                "--eval-interval 100", "--auto-detect-ckpt-format", f"--load {data['checkpoint']}",
                f"--save {data['checkpoint']}", "--save-interval 100", "--dist-ckpt-strictness log_all",
                "--init-method-std 0.02", "--log-timers-to-tensorboard", "--log-memory-to-tensorboard",
                "--log-num-zeros-in-grad", "--log-params-norm", "--log-validation-ppl-to-tensorboard",
                "--log-throughput", "--log-interval 1", "--logging-level 40",
                f"--tensorboard-dir {data['tensorboard']}", "--bf16", "--enable-experimental"]
    fsdp = ["--use-megatron-fsdp", "--data-parallel-sharding-strategy optim_grads_params",
            "--no-gradient-accumulation-fusion", "--use-distributed-optimizer", "--calculate-per-token-loss",
            "--init-model-with-meta-device", "--ckpt-format fsdp_dtensor", "--fsdp-double-buffer", "--use-nccl-ub",
            "--megatron-fsdp-grad-comm-dtype bf16", "--megatron-fsdp-main-grads-dtype bf16"]
    wandb = ["--wandb-project your_own_wandb_project", "--wandb-exp-name DeepSeek-V3-TP1EP8-MBS4GBS2048-"]
    return [pretrain, fsdp, wandb]


def qwen3_30b_a3b(data: dict[str, str], n: Callable) -> list[list[str]]:
    """Qwen3-30B-A3B's MODEL_ARGS in the same ModelZoo (model_configs/benchmarking/Qwen3-30B-A3B.yaml), as flags;
    its data arguments (a Hub tokenizer and a corpus) replaced by mock data, the dispatcher variable set to flex."""
    distributed = ["--distributed-timeout-minutes 60", "--tensor-model-parallel-size 1",
                   "--pipeline-model-parallel-size 1", "--expert-model-parallel-size 1", "--context-parallel-size 1",
                   "--expert-tensor-parallel-size 1", "--use-distributed-optimizer", "--overlap-grad-reduce",
                   "--overlap-param-gather", "--no-create-attention-mask-in-dataloader"]
    training = ["--use-mcore-models", "--sequence-parallel", "--use-flash-attn", "--disable-bias-linear",
                "--micro-batch-size 1", f"--global-batch-size {n(1024, 4)}", f"--train-samples {n(268554688, 8)}",
                "--exit-duration-in-mins 230", "--manual-gc", "--manual-gc-interval 5",
                "--transformer-impl transformer_engine"]
    data_args = ["--mock-data", "--tokenizer-type NullTokenizer", f"--vocab-size {n(151936, 300)}",
                 f"--data-cache-path {data['cache']}", "--split 99,1,0", "--no-mmap-bin-files",
                 f"--num-workers {n(6, 1)}"]
    network = ["--untie-embeddings-and-output-weights", "--position-embedding-type rope", "--rotary-percent 1.0",
               "--rotary-base 1000000", "--rotary-seq-len-interpolation-factor 1", "--normalization RMSNorm",
               "--swiglu", "--norm-epsilon 1e-06", f"--num-layers {n(48, 2)}", f"--hidden-size {n(2048, 32)}",
               f"--ffn-hidden-size {n(6144, 64)}", f"--num-attention-heads {n(32, 4)}", "--group-query-attention",
               f"--num-query-groups {n(4, 2)}", f"--kv-channels {n(128, 16)}", "--qk-layernorm",
               f"--seq-length {n(4096, 16)}", f"--max-position-embeddings {n(40960, 64)}",
               "--make-vocab-size-divisible-by 1187"]
    regularization = ["--attention-dropout 0.0", "--hidden-dropout 0.0", "--clip-grad 1.0", "--weight-decay 0.1"]
    learning_rate = [f"--lr-decay-samples {n(255126953, 12)}", f"--lr-warmup-samples {n(162761, 4)}", "--lr 1.2e-4",
                     "--min-lr 1.2e-5", "--lr-decay-style cosine", "--adam-beta1 0.9", "--adam-beta2 0.95"]
    moe = [f"--num-experts {n(128, 8)}", f"--moe-ffn-hidden-size {n(768, 16)}",
           "--moe-router-load-balancing-type aux_loss", f"--moe-router-topk {n(8, 4)}", "--moe-grouped-gemm",
           "--moe-aux-loss-coeff 1e-3", "--moe-token-dispatcher-type flex", "--moe-permute-fusion",
           "--moe-router-dtype fp32"]
    rest = [f"--eval-iters {n(32, 1)}", "--eval-interval 500", "--finetune", "--auto-detect-ckpt-format",
            f"--load {data['checkpoint']}", f"--save {data['checkpoint']}", "--save-interval 500",
            "--dist-ckpt-strictness log_all", "--init-method-std 0.02", "--log-timers-to-tensorboard",
            "--log-memory-to-tensorboard", "--log-num-zeros-in-grad", "--log-params-norm",
            "--log-validation-ppl-to-tensorboard", "--log-throughput", "--log-interval 1",
            f"--tensorboard-dir {data['tensorboard']}", "--wandb-project qwen3", "--wandb-exp-name Qwen3-30B-A3B",
            "--bf16"]
    return [distributed, training, data_args, network, regularization, learning_rate, moe, rest]


# Each script's world at its own sizes: tp x pp x dp, the nodes its parallel sizes need.
# (DeepSeek-V3's recipe is not among them: its 61 layers over pp 8 need uneven stages, which are refused here.)
WORLDS = {gpt3_175b: 128, llama3_8b_h200_bf16: 8, mixtral_8x7b: 32, deepseek_v3_megatron_fsdp: 256}


def their_sizes(real: object, tiny: object) -> object:
    return real


def tiny_sizes(real: object, tiny: object) -> object:
    return tiny


def expand(arrays: list[list[str]]) -> list[str]:
    """`${ARRAY[@]}` unquoted, as the scripts pass them: every element split at whitespace; then the
    flags a missing optional package owns, with their values, left out."""
    words = [word for array in arrays for element in array for word in element.split()]
    stripped = {} if importlib.util.find_spec("wandb") else WANDB_FLAGS
    kept, skip = [], 0
    for word in words:
        if skip:
            skip -= 1
        elif word in stripped:
            skip = stripped[word]
        else:
            kept.append(word)
    return kept


def gpt2_files(folder: Path) -> tuple[str, str]:
    """A GPT-2 vocab.json and merges.txt: the 256 byte-level symbols, two merges, <|endoftext|>."""
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate([*symbols, "th", "the", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e\n")
    return str(folder / "vocab.json"), str(folder / "merges.txt")


def paths(root: Path, vocab_file: str = "gpt2-vocab.json", merge_file: str = "gpt2-merges.txt") -> dict[str, str]:
    """The scripts' paths, replaced by files under `root`."""
    return {"data_path": str(root / "corpus_text_document"), "vocab_file": vocab_file, "merge_file": merge_file,
            "checkpoint": str(root / "checkpoints"), "tensorboard": str(root / "tensorboard"),
            "cache": str(root / "cache"), "tokenizer_model": str(root / "tokenizer.model")}


def test_the_scripts_at_their_own_sizes_pass_the_dry_run_and_the_docs_name_their_flags(tmp_path, capsys) -> None:
    """The dry run reads the tokenizers only (for the vocabulary): GPT-2's files and a SentencePiece model."""
    write_corpus(tmp_path)
    train_tokenizer.main(["--input", str(tmp_path / "notes.txt"), "--tokenizer-type", "SentencePieceTokenizer",
                          "--vocab-size", "300", "--output", str(tmp_path / "tokenizer.model")])
    data = paths(tmp_path, *gpt2_files(tmp_path))
    for script, world in WORLDS.items():
        flags = expand(script(data, their_sizes))
        assert pretrain_gpt.main([*flags, "--dry-run", "--world-size", str(world)]) == 0, capsys.readouterr().err
        assert f"on world {world}" in capsys.readouterr().out
    table = (ROOT / "docs" / "megatron_compat.md").read_text()
    named = {word for script in (*WORLDS, deepseek_v3, qwen3_30b_a3b) for array in script(data, their_sizes)
             for element in array for word in element.split() if word.startswith("--")}
    assert not sorted(flag for flag in named if f"`{flag}`" not in table)


def test_the_qwen3_moe_recipe_runs_to_its_last_iteration(tmp_path: Path, capsys) -> None:
    """In process at world 1 (its parallel sizes are 1), shrunk, on mock data; --finetune with a --load
    that does not exist yet starts fresh, as a first launch does."""
    assert pretrain_gpt.main([*expand(qwen3_30b_a3b(paths(tmp_path), tiny_sizes)), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert re.search(r" iteration +2/ +2 \| .* throughput per GPU \(TFLOP/s/GPU\)", out), out[-2000:]


def test_the_megatron_fsdp_deepseek_v3_script_runs_to_its_last_iteration(tmp_path: Path, capsys) -> None:
    """In process at world 1 (tp 1; ep shrunk to 1), shrunk, on mock data: MLA with its YaRN, MTP on a MoE layer,
    ZeRO-3, per-token loss, recomputed MLA up-projections, forced load balancing; the checkpoint it saves at its end
    is DCP (fsdp_dtensor read as torch_dist)."""
    assert pretrain_gpt.main([*expand(deepseek_v3_megatron_fsdp(paths(tmp_path), tiny_sizes)), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert re.search(r" iteration +2/ +2 \| .* mtp_1 loss", out), out[-2000:]
    assert "--ckpt-format fsdp_dtensor (torch_dist here)" in out


@pytest.mark.parametrize("script", [gpt3_175b, llama3_8b_h200_bf16, mixtral_8x7b, deepseek_v3])
def test_megatron_example_script_runs_to_its_last_iteration(script, tmp_path: Path) -> None:
    """Under torchrun at world 2 on the corpus preprocessed with the script's tokenizer (GPT-2's files; Mixtral's
    Llama2Tokenizer: a SentencePiece model trained here), or on mock data."""
    vocab_file, merge_file = gpt2_files(tmp_path)
    write_corpus(tmp_path)
    if script is mixtral_8x7b:
        train_tokenizer.main(["--input", str(tmp_path / "notes.txt"), "--tokenizer-type", "SentencePieceTokenizer",
                              "--vocab-size", "300", "--output", str(tmp_path / "tokenizer.model")])
        tokenizer = ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", str(tmp_path / "tokenizer.model")]
    else:
        tokenizer = ["--vocab-file", vocab_file, "--merge-file", merge_file]
    preprocess_data.main(["--input", str(tmp_path / "docs.jsonl"), "--output-prefix", str(tmp_path / "corpus"),
                          *tokenizer, "--append-eod"])
    data = paths(tmp_path, vocab_file, merge_file)
    flags = expand(script(data, tiny_sizes))
    last = 4
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = run_command([*launcher, "pretrain_gpt.py", *flags, "--device", "cpu"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(rf" iteration +{last}/ +{last} \|", result.stdout), result.stdout[-3000:]
    assert result.stdout.count("accepted, no effect here: --") == 1  # once, on rank 0
    assert (tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == str(last)
