"""Training throughput of megatron_lite against Hugging Face transformers' Llama, same shape, same device.

    python tools/benchmark_training.py                       # GPU: llama-1b, seq 2048, bf16, micro batch 4
    python tools/benchmark_training.py --csv train.csv --micro-batch-size 8 --rows megatron_lite hf-eager
    python tools/benchmark_training.py --num-layers 4        # other flags: pretrain_gpt.py model flags
    python tools/benchmark_training.py --device cpu          # CPU smoke: 2 layers, hidden 64, seq 64, fp32

Each row trains the model for --warmup untimed steps, then --steps timed ones, all rows in
this one process on the same random tokens (megatron_lite/data/random_tokens.py). A step is
one micro batch: global batch = micro batch, one optimizer step.

  megatron_lite          our training step (parallelize + train_step, as pretrain runs it), fused kernels
  megatron_lite-unfused  the same with --no-fused-kernels (plain torch ops)
  megatron_lite-compile  the same with --compile (each transformer layer under torch.compile)
  megatron_lite-recompute-selective, megatron_lite-recompute-full
                         the same with --recompute-granularity selective (core_attn) or full
                         (uniform, every layer): the peak memory each saves and its step time
                         (for llama-1b at seq 4096, as docs/parallelism.md asks: --seq-length 4096)
  hf-eager               transformers LlamaForCausalLM of the same shape (hf_families.hf_config), sdpa
                         attention, plain torch.optim.AdamW (fused on CUDA), same clipping and lr
  hf-compile             the same, the model under torch.compile

Precision: on GPU bf16, on CPU fp32. Our rows run --bf16 (bf16 weights, fp32 grads, main
parameters and Adam state); the HF rows keep fp32 weights under bf16 autocast, as transformers'
Trainer runs --bf16, so their weights take 4 bytes a parameter against our 2. Columns: tokens/s over the timed
steps, model TFLOP/s per device and MFU (megatron_lite/planner/flops.py, the formula and peak table
the training log uses), peak allocated GPU memory (n/a on CPU: the process's peak resident
set only ever grows, so later rows could not be told apart), the last step's loss, and
tokens/s relative to hf-eager. A row that fails (out of memory, say) shows its error and the
others still run.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lite import parallel_state  # noqa: E402
from megatron_lite.config import Config, ModelConfig  # noqa: E402
from megatron_lite.data.loader import global_batch  # noqa: E402
from megatron_lite.data.random_tokens import RandomTokens  # noqa: E402
from megatron_lite.hf.families import hf_config  # noqa: E402
from megatron_lite.planner.flops import flops_per_step  # noqa: E402
from megatron_lite.planner.hardware import peak_tflops  # noqa: E402
from megatron_lite.training.arguments import parse_args  # noqa: E402
from megatron_lite.training.loop import rank_microbatches, select_device, set_seed, train_step  # noqa: E402
from megatron_lite.training.parallelize import parallelize  # noqa: E402

# Our rows: the pretrain_gpt.py flags each adds to the common ones.
OUR_ROWS = {"megatron_lite": [], "megatron_lite-unfused": ["--no-fused-kernels"],
            "megatron_lite-compile": ["--compile"],
            "megatron_lite-recompute-selective": ["--recompute-granularity", "selective"],
            "megatron_lite-recompute-full": ["--recompute-granularity", "full", "--recompute-method", "uniform"]}
HF_ROWS = ("hf-eager", "hf-compile")
ROWS = (*OUR_ROWS, *HF_ROWS)
BASELINE = "hf-eager"
CPU_SHAPE = ["--model", "tiny", "--num-layers", "2", "--hidden-size", "64"]
CSV_FIELDS = ("row", "tokens_per_s", "tflops_per_device", "mfu", "peak_mem_gib", "final_loss", "vs_hf_eager", "note")


@dataclasses.dataclass
class Result:
    row: str
    tokens_per_s: float | None = None
    tflops_per_device: float | None = None
    mfu: float | None = None
    peak_mem_gib: float | None = None
    final_loss: float | None = None
    vs_hf_eager: float | None = None
    note: str = ""


def common_flags(args: argparse.Namespace, model_flags: list[str]) -> list[str]:
    """pretrain_gpt.py flags every row shares: shape, batch, device, precision, a constant lr."""
    on_cpu = args.device == "cpu"
    shape = (CPU_SHAPE if on_cpu else ["--model", "llama-1b"]) if args.model is None else ["--model", args.model]
    seq = args.seq_length or (64 if on_cpu else None)
    batch = str(args.micro_batch_size)
    # Constant lr from the first step: the rows differ in speed only, not in the schedule they follow.
    return [*shape, *(["--seq-length", str(seq)] if seq else []), *model_flags,
            "--micro-batch-size", batch, "--global-batch-size", batch, "--train-iters", str(args.warmup + args.steps),
            "--lr-warmup-iters", "0", "--lr-decay-style", "constant", "--eval-interval", "0",
            "--device", args.device, *([] if on_cpu else ["--bf16"])]


def build_config(flags: list[str], vocab_size: int) -> Config:
    # A training run takes the vocabulary from the tokenizer; there is none here.
    return parse_args(flags).updated(model={"vocab_size": vocab_size})


def our_step(config: Config, data: RandomTokens, device: torch.device) -> Callable[[int], float]:
    """Step i of our training loop (1-based iteration i + 1, samples from i * batch on)."""
    model = parallelize(config, device)

    def step(i: int) -> float:
        batches = rank_microbatches(data, i * config.train.global_batch_size, config, device)
        return train_step(model, batches, i + 1, config, device)[0]
    return step


def hf_step(config: Config, data: RandomTokens, device: torch.device, compile_model: bool) -> Callable[[int], float]:
    """Step i of a plain PyTorch loop around LlamaForCausalLM, with our row's hyperparameters."""
    from transformers import AutoModelForCausalLM, LlamaConfig  # here: our rows run without transformers

    # The padded vocabulary, so that both sides multiply the same matrices (flops_per_step counts it).
    shape = dataclasses.replace(config.model, vocab_size=config.model.padded_vocab_size())
    with device:  # weights made on the device: a 1B model's init on the CPU would take longer than the run
        model = AutoModelForCausalLM.from_config(LlamaConfig(**hf_config(shape)), attn_implementation="sdpa")
    model.train()
    forward = torch.compile(model) if compile_model else model
    cfg = config.train
    # Megatron's groups, as our optimizer has them: no weight decay on norm weights.
    groups = [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": cfg.weight_decay},
              {"params": [p for p in model.parameters() if p.ndim == 1], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                  fused=device.type == "cuda")
    batch_size = cfg.global_batch_size

    def step(i: int) -> float:
        batch = next(global_batch(data, i * batch_size, batch_size, batch_size, device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = forward(input_ids=batch["tokens"]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())
        loss.backward()
        if cfg.clip_grad > 0:  # 0 turns clipping off, as in our clip_grad_norm
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # synchronises, as our train_step's loss does: neither loop runs ahead of the device
    return step


def timed_steps(step: Callable[[int], float], warmup: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(seconds of the timed steps, last loss); the warm-up steps (compilation, allocator) are not timed."""
    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        loss = step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, loss


def run_row(row: str, flags: list[str], args: argparse.Namespace) -> Result:
    """One row in a fresh grid, seeded alike; an exception becomes the row's note."""
    try:
        config = build_config(flags + OUR_ROWS.get(row, []), args.vocab_size)
        parallel_state.initialize_model_parallel(config.parallel)
        device = select_device(config)
        set_seed(config.train.seed, device)
        data = RandomTokens(config.model.vocab_size, config.model.seq_length)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step = our_step(config, data, device) if row in OUR_ROWS else hf_step(config, data, device,
                                                                              row == "hf-compile")
        graphs_before = compiled_graphs()
        seconds, loss = timed_steps(step, args.warmup, args.steps, device)
        graphs = compiled_graphs() - graphs_before
    except Exception as exc:  # out of memory, a compile failure: report it and go on to the next row
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return Result(row, note=f"{type(exc).__name__}: {first_line[:160]}")
    finally:
        parallel_state.destroy_model_parallel()
    tflops = flops_per_step(config.model, config.train.global_batch_size) * args.steps / seconds / 1e12
    peak = _peak_tflops(device)
    return Result(row, tokens_per_s=config.train.global_batch_size * config.model.seq_length * args.steps / seconds,
                  tflops_per_device=tflops, mfu=None if peak is None else tflops / peak,
                  peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                  final_loss=loss, note=compile_note(row, graphs))


def compiled_graphs() -> int:
    """Graphs torch.compile has captured so far in this process (dynamo's own count)."""
    return counters["stats"]["unique_graphs"]


def compile_note(row: str, graphs: int) -> str:
    """For a compile row, how many graphs dynamo captured: none means the row ran eager (a flag
    not wired in); identical layers share one graph, so more than one per compiled module class
    points at graph breaks or recompiles."""
    if not row.endswith("-compile"):
        return ""
    return f"compiled graphs: {graphs}" if graphs else "nothing was compiled: this row ran eager"


def _peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of the device (megatron_lite/planner/hardware.py); None on CPU."""
    return peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    """Drop what the last row left: compiled graphs (which hold its weights) and cached GPU blocks."""
    gc.collect()
    torch.compiler.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _cell(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def describe_run(shape: ModelConfig, device: torch.device, args: argparse.Namespace) -> str:
    """The table's first line: device, precision, peak, torch, model shape and step counts."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return (f"device {name} ({'bf16' if device.type == 'cuda' else 'fp32'}, peak "
            f"{_cell(_peak_tflops(device), '.0f')} TFLOP/s), torch {torch.__version__}; {shape.family} "
            f"{shape.num_layers} layers, hidden {shape.hidden_size}, heads {shape.num_attention_heads}/"
            f"{shape.num_query_groups}, ffn {shape.ffn_hidden_size}, vocab {shape.padded_vocab_size()}, seq "
            f"{shape.seq_length}, micro batch {args.micro_batch_size}; {args.warmup} warm-up + {args.steps} "
            f"timed steps")


def print_table(results: list[Result], header: str) -> None:
    print(header)
    print(f"{'row':<22s} {'tokens/s':>10s} {'TFLOP/s':>9s} {'MFU':>6s} {'peak GiB':>9s} {'loss':>7s} "
          f"{'vs ' + BASELINE:>12s}  note")
    for r in results:
        print(f"{r.row:<22s} {_cell(r.tokens_per_s, '.0f'):>10s} {_cell(r.tflops_per_device, '.3g'):>9s} "
              f"{_cell(r.mfu, '.1%'):>6s} {_cell(r.peak_mem_gib, '.2f'):>9s} {_cell(r.final_loss, '.4f'):>7s} "
              f"{_cell(r.vs_hf_eager, '.2f'):>12s}  {r.note}".rstrip(), flush=True)


def write_csv(path: str, results: list[Result]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in results:
            writer.writerow({k: "" if v is None else v for k, v in dataclasses.asdict(r).items()})


def parse_tool_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """This tool's flags, and the rest: pretrain_gpt.py model flags (--num-layers 4) for every row."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Any other flag is a pretrain_gpt.py model flag for every row, e.g. "
                                            "--num-layers 4 --hidden-size 1024.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", help="pretrain_gpt.py preset (default: llama-1b on GPU, a 2-layer tiny on CPU)")
    parser.add_argument("--seq-length", type=int, help="default: the preset's on GPU, 64 on CPU")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, help="default: 32000 on GPU, 256 on CPU")
    parser.add_argument("--steps", type=int, help="timed steps (default: 10 on GPU, 3 on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 3 on GPU, 1 on CPU)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--csv", help="also write the table to this CSV file")
    args, model_flags = parser.parse_known_args(argv)
    on_cpu = args.device == "cpu"
    args.vocab_size = args.vocab_size or (256 if on_cpu else 32000)
    args.steps = args.steps or (3 if on_cpu else 10)
    args.warmup = (1 if on_cpu else 3) if args.warmup is None else args.warmup
    return args, model_flags


def main(argv: list[str] | None = None) -> int:
    args, model_flags = parse_tool_args(argv)
    flags = common_flags(args, model_flags)
    config = build_config(flags, args.vocab_size)  # a bad flag fails here, before any row
    device = select_device(config)
    results = []
    for row in args.rows:
        start = time.perf_counter()
        results.append(run_row(row, flags, args))
        free_memory(device)
        print(f"{row}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)  # a GPU run takes minutes
    base = next((r.tokens_per_s for r in results if r.row == BASELINE), None)
    for r in results:
        r.vs_hf_eager = r.tokens_per_s / base if base and r.tokens_per_s else None
    print_table(results, describe_run(config.model, device, args))
    if args.csv:
        write_csv(args.csv, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
