"""Continue a prompt with a trained model: `python tools/generate.py --load CKPT --prompt TEXT`.

CKPT is a checkpoint directory of any layout (its shards are reassembled onto one device) or a
Hugging Face folder (tools/convert_checkpoint.py to-hf). stdout gets the prompt and its
continuation and nothing else; what was loaded and how fast it ran go to stderr. Greedy
decoding (--greedy) gives what `transformers`' generate gives on the Hugging Face export.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_lite.config import ConfigError, TrainConfig  # noqa: E402
from megatron_lite.data.documents import DocumentMasking  # noqa: E402
from megatron_lite.data.tokenizer import Tokenizer, build_tokenizer  # noqa: E402
from megatron_lite.hf.convert import TOKENIZER_FILES  # noqa: E402
from megatron_lite.inference.generation import generate, load_model  # noqa: E402
from megatron_lite.inference.sampling import SamplingParams  # noqa: E402
from megatron_lite.training.arguments import add_dataclass_flags  # noqa: E402

# A prompt holding end-of-document tokens is continued as training saw packed documents.
DOCUMENT_FLAGS = ("reset_position_ids", "reset_attention_mask")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--load", required=True, help="checkpoint directory (any layout) or Hugging Face folder")
    parser.add_argument("--ckpt-step", type=int, help="iteration to load (default: the latest)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true", help="take the most likely token at every step")
    parser.add_argument("--temperature", type=float, default=1.0, help="0: the most likely token, as --greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=0.0,
                        help="sample among the most likely tokens whose probability reaches p (0: all)")
    parser.add_argument("--seed", type=int, default=1234, help="of the sampling generator")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if visible, else cpu")
    parser.add_argument("--bf16", action="store_true", help="run the model in bf16 (default: fp32)")
    # The tokenizer and document flags of pretrain_gpt.py; by default the checkpoint's own.
    add_dataclass_flags(parser, TrainConfig, ("tokenizer_type", "tokenizer_model", *DOCUMENT_FLAGS))
    return parser


def choose_tokenizer(args: argparse.Namespace, load: Path, train: dict | None) -> Tokenizer:
    """The flags' tokenizer, else the one the run trained with, else a Hugging Face folder's own."""
    if hasattr(args, "tokenizer_type"):
        return build_tokenizer(args.tokenizer_type, getattr(args, "tokenizer_model", None))
    if train is not None:
        return build_tokenizer(train["tokenizer_type"], train.get("tokenizer_model"))
    if any((load / name).exists() for name in TOKENIZER_FILES):
        return build_tokenizer("HuggingFaceTokenizer", str(load))
    raise ConfigError(f"--load={load} holds no tokenizer files; name one with --tokenizer-type and --tokenizer-model")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = SamplingParams(args.greedy, args.temperature, args.top_k, args.top_p)
        params.validate()
        if args.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens={args.max_new_tokens} must be positive")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device=cuda but no CUDA device is visible; allowed here: cpu")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        load = Path(args.load)
        if not load.is_dir():
            raise ConfigError(f"--load={load} does not exist or is not a directory")
        model, train = load_model(load, args.ckpt_step, device)
        if args.bf16:
            model.to(torch.bfloat16)
        tokenizer = choose_tokenizer(args, load, train)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"> loaded {load}: {model.config.family} family, {n_params:,} parameters, on {device}", file=sys.stderr)
        start = time.perf_counter()
        flags = {name: getattr(args, name) for name in DOCUMENT_FLAGS if hasattr(args, name)}
        documents = DocumentMasking.of({**(train or {}), **flags}, tokenizer.eod)
        ids = generate(model, tokenizer.encode(args.prompt), args.max_new_tokens, params, tokenizer.eod,
                       torch.Generator(device).manual_seed(args.seed), documents)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"generate.py: error: {exc}\n")
        return 2
    seconds = time.perf_counter() - start
    ended = "end of document" if ids[-1] == tokenizer.eod else f"--max-new-tokens={args.max_new_tokens}"
    print(f"> {len(ids)} tokens in {seconds:.2f} s ({len(ids) / seconds:.1f} tokens/s), stopped at {ended}",
          file=sys.stderr)
    print(args.prompt + tokenizer.decode(ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
