"""Convert checkpoints between layouts and to and from Hugging Face `transformers`.

    python tools/convert_checkpoint.py reshard --load DIR --out DIR2 --tp 1 --pp 2 [--vpp 2] \
        [--dp 2 --use-distributed-optimizer]
    python tools/convert_checkpoint.py to-hf --load DIR --out HFDIR
    python tools/convert_checkpoint.py from-hf HFDIR --out DIR --tp 2 --pp 2

reshard and from-hf write the target layout the way training does: they spawn its ranks on
CPU (gloo), each loads its own slices (megatron_lite/checkpointing/reshard.py) and saves. to-hf needs no
ranks: the tensor-parallel layout stored in every file says how to reassemble the weights.
from-hf writes a weights-only checkpoint: `pretrain_gpt.py --load DIR` starts it at
iteration 0 with a fresh optimizer. The folder's tokenizer files are copied to DIR/tokenizer,
for --tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR/tokenizer (tools/preprocess_data.py
takes the same two flags).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_lite import parallel_state  # noqa: E402
from megatron_lite.checkpointing import (  # noqa: E402
    latest_iteration,
    load_checkpoint,
    read_common,
    save_checkpoint,
    saved_config,
    saved_weights,
)
from megatron_lite.checkpointing.reshard import load_weights  # noqa: E402
from megatron_lite.config import CKPT_FORMATS, Config, ConfigError, ModelConfig, ParallelConfig  # noqa: E402
from megatron_lite.distributed.spawn import run_on_ranks  # noqa: E402
from megatron_lite.hf.convert import TOKENIZER_FILES, FromHF, SafetensorsFolder, hf_tensors, save_safetensors  # noqa: E402
from megatron_lite.hf.families import ARCHITECTURES, hf_config, model_config_from_hf  # noqa: E402
from megatron_lite.hf.tokenizer import copy_tokenizer_files, export_tokenizer  # noqa: E402
from megatron_lite.training.parallelize import build_chunks, parallelize  # noqa: E402

TOKENIZER_DIR = "tokenizer"  # from-hf's copy of the folder's tokenizer, inside the checkpoint directory


def _latest(load: str) -> int:
    iteration = latest_iteration(load)
    if iteration is None:
        raise ConfigError(f"--load={load} holds no checkpoint (no latest_checkpointed_iteration.txt)")
    return iteration


def reshard_rank(load: str, out: str, config: Config) -> None:
    """One rank of the target layout: load (resharding) and save."""
    par = config.parallel
    parallel_state.initialize_model_parallel(par)
    model = parallelize(config, torch.device("cpu"))
    iteration, consumed = load_checkpoint(load, model.chunks, model.optimizer, config)
    save_checkpoint(out, iteration, consumed, model.chunks, model.optimizer, config)


def import_rank(hf_dir: str, out: str, config: Config) -> None:
    """One rank of the target layout: take its slices of the HF weights and save them, weights only."""
    par = config.parallel
    parallel_state.initialize_model_parallel(par)
    chunks = build_chunks(config)
    # One of our tensors at a time, this rank's slice of it only, read from the slices of its HF tensors (safe_open).
    load_weights(FromHF(SafetensorsFolder(Path(hf_dir)), config.model), chunks)
    save_checkpoint(out, 0, 0, chunks, None, config)


def _layout(config: Config, args: argparse.Namespace) -> Config:
    """`config` at the target layout and format the flags give (validated whole); its world size is tp x pp x dp."""
    return config.updated(train=dict(ckpt_format=args.ckpt_format), parallel=dict(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=args.vpp if args.vpp > 1 else None, pipeline_schedule=None,
        data_parallel_size=args.dp, use_distributed_optimizer=args.use_distributed_optimizer,
        sequence_parallel=config.parallel.sequence_parallel and args.tp > 1))


def reshard(args: argparse.Namespace) -> None:
    config = saved_config(read_common(args.load, _latest(args.load))["config"])
    config = _layout(config, args)
    run_on_ranks(reshard_rank, args.tp * args.pp * args.dp, args.load, args.out, config)
    print(f"resharded {args.load} to tp={args.tp} pp={args.pp} vpp={args.vpp} dp={args.dp} in {args.out} "
          f"({args.ckpt_format} format)")


def to_hf(args: argparse.Namespace) -> None:
    iteration = _latest(args.load)
    saved = read_common(args.load, iteration)
    model = ModelConfig(**saved["config"]["model"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # First: it is quick and fails on a tokenizer that is gone or converts wrongly, before the weights.
    token_ids, tokenizer_line = export_tokenizer(saved["config"]["train"], model.vocab_size, out)
    # The families' config defaults name other vocabularies' ids (GPT-2's 50256), so generate would not stop on eod.
    config = {**hf_config(model), **token_ids}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    # Streamed: one of our tensors read at a time, its HF tensors written into the shard being filled.
    files = save_safetensors(hf_tensors(saved_weights(args.load, iteration), model), out,
                             int(args.max_shard_size_gb * 2**30))
    print(f"wrote {out}: config.json, {', '.join(files)} ({config['architectures'][0]}, iteration {iteration})")
    if model.mtp_depths:
        print(f"left out the {model.mtp_depths} multi-token prediction module(s) (mtp.layers.*): no Hugging Face "
              "family we export has them")
    print(tokenizer_line)


def from_hf(args: argparse.Namespace) -> None:
    hf_dir = Path(args.hf_dir)
    if not (hf_dir / "config.json").exists():
        raise ConfigError(f"{hf_dir} has no config.json")
    model = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()), args.make_vocab_size_divisible_by)
    config = Config(model=model, parallel=ParallelConfig())
    args.dp, args.use_distributed_optimizer = 1, False
    config = _layout(config, args)
    run_on_ranks(import_rank, args.tp * args.pp * args.dp, str(hf_dir), args.out, config)
    print(f"imported {hf_dir} ({model.family} family) to {args.out} at tp={args.tp} pp={args.pp}: weights only, "
          "pretrain_gpt.py --load starts from it at iteration 0 with a fresh optimizer")
    # The model's whole context is rarely what one trains at (131,072 tokens for Llama 3.2): say so.
    print(f"sequence length: {model.seq_length}, config.json's whole context; pretrain_gpt.py --load {args.out} "
          "--seq-length N trains at N tokens instead (the model keeps its context)")
    tokenizer = Path(args.out) / TOKENIZER_DIR
    copied = copy_tokenizer_files(hf_dir, tokenizer)
    if copied:
        print(f"tokenizer: copied {', '.join(copied)} to {tokenizer}: preprocess and train with --tokenizer-type "
              f"HuggingFaceTokenizer --tokenizer-model {tokenizer}")
    else:
        print(f"tokenizer: {hf_dir} has none of {', '.join(TOKENIZER_FILES)}; none copied")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("reshard", "from-hf"):
        sub = commands.add_parser(name)
        if name == "from-hf":
            sub.add_argument("hf_dir", help="local Hugging Face folder of a family in megatron_lite/hf/families.py "
                                             f"({', '.join(ARCHITECTURES.values())})")
            sub.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
        else:
            sub.add_argument("--load", required=True)
            sub.add_argument("--dp", type=int, default=1,
                             help="data-parallel size (it decides the files only with the distributed optimizer)")
            sub.add_argument("--use-distributed-optimizer", action="store_true")
        sub.add_argument("--out", required=True)
        sub.add_argument("--tp", type=int, default=1)
        sub.add_argument("--pp", type=int, default=1)
        sub.add_argument("--vpp", type=int, default=1)
        sub.add_argument("--ckpt-format", choices=CKPT_FORMATS, default="torch_dist",
                         help="format of the checkpoint written to --out (pretrain_gpt.py's flag)")
    hf = commands.add_parser("to-hf")
    hf.add_argument("--load", required=True)
    hf.add_argument("--out", required=True)
    hf.add_argument("--max-shard-size-gb", type=float, default=2.0, help="split model.safetensors above this size")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        {"reshard": reshard, "to-hf": to_hf, "from-hf": from_hf}[args.command](args)
    except ConfigError as exc:
        # One write (print makes two): the lines of ranks that share a pipe stay whole.
        sys.stderr.write(f"convert_checkpoint.py: error: {exc}\n")
        sys.stderr.flush()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
