"""Command line built from the config dataclasses, with Megatron's flag names and model presets."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import types
import typing

from megatron_lite.config import (
    CKPT_FORMATS,
    CP_COMM_TYPES,
    DATA_PARALLEL_MODES,
    FAMILIES,
    LR_DECAY_STYLES,
    LR_WSD_DECAY_STYLES,
    MOE_DISPATCHERS,
    MOE_LOAD_BALANCING,
    MOE_SCORE_FUNCTIONS,
    MUON_COEFFICIENTS,
    MUON_SCALE_MODES,
    MUON_TP_MODES,
    OPTIMIZERS,
    RECOMPUTE_GRANULARITIES,
    RECOMPUTE_METHODS,
    RECOMPUTE_MODULES,
    ROPE_SCALING_TYPES,
    SCHEDULES,
    SHARDING_STRATEGIES,
    Config,
    ConfigError,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
    field_docs,
)
from megatron_lite.data.tokenizer import TOKENIZERS
from megatron_lite.parallel_state import axis_sizes
from megatron_lite.planner.hardware import GPUS
from megatron_lite.training.megatron_flags import add_megatron_flags, flags_markdown_rows, megatron_settings
from megatron_lite.training.presets import DEFAULT_PRESET, PRESETS

# Fields that are not flags: derived at run time, never typed by a user.
_DERIVED = {"vocab_size", "data_parallel_size"}
_CHOICES = {"family": FAMILIES, "lr_decay_style": LR_DECAY_STYLES, "lr_wsd_decay_style": LR_WSD_DECAY_STYLES,
            "device": ("cpu", "cuda"),
            "pipeline_schedule": SCHEDULES, "cp_comm_type": CP_COMM_TYPES, "tokenizer_type": tuple(TOKENIZERS),
            "moe_router_score_function": MOE_SCORE_FUNCTIONS, "moe_router_load_balancing_type": MOE_LOAD_BALANCING,
            "moe_token_dispatcher_type": (*MOE_DISPATCHERS, "flex"),
            "data_parallel_sharding_strategy": SHARDING_STRATEGIES,
            "data_parallel_mode": DATA_PARALLEL_MODES,
            "recompute_granularity": RECOMPUTE_GRANULARITIES, "recompute_method": RECOMPUTE_METHODS,
            "recompute_modules": RECOMPUTE_MODULES, "rope_scaling_type": ROPE_SCALING_TYPES,
            "optimizer": OPTIMIZERS, "muon_coefficient_type": tuple(MUON_COEFFICIENTS),
            "muon_scale_mode": MUON_SCALE_MODES, "muon_tp_mode": MUON_TP_MODES,
            "ckpt_format": (*CKPT_FORMATS, "fsdp_dtensor")}
# Megatron's names where ours would differ, and the short aliases Megatron users type.
_ALIASES: dict[str, list[str]] = {"tensor_model_parallel_size": ["--tp"], "sequence_parallel": ["--sp"],
                                  "context_parallel_size": ["--cp"], "expert_model_parallel_size": ["--ep"],
                                  "pipeline_model_parallel_size": ["--pp"],
                                  "virtual_pipeline_model_parallel_size": ["--vpp"],
                                  "data_cache_dir": ["--data-cache-path"], "tokenizer_vocab_size": ["--vocab-size"]}
# Megatron's spelling of a flag that turns a default-on field off, where it is not --no-field-name.
_NEGATIONS = {"muon_split_qkv": "--muon-no-split-qkv"}
# How pretrain_gpt.py runs rather than what it trains, so not Config fields: a dry run checks the
# configuration for a world it need not be on and describes it by the planner's formulas.
_LAUNCH_FLAGS: dict[str, dict] = {
    "--dry-run": dict(action="store_true", help="Validate the whole configuration for the world size, print the "
                      "layout, the memory of each pipeline stage's ranks and the planner's prediction, and exit 0 "
                      "without building the model or reading data."),
    "--world-size": dict(type=int, metavar="N", help="With --dry-run: the number of ranks to validate for (default: "
                         "torchrun's WORLD_SIZE, else 1)."),
    "--gpu": dict(type=str.upper, choices=sorted(GPUS), help="With --dry-run: also predict the step time, tokens/s, "
                  "MFU and whether it fits on GPUs of this type (tools/plan_parallelism.py's model)."),
}


def _window_pair(text: str) -> int | None:
    """--window-size as Megatron takes it, LEFT,RIGHT (or one number, LEFT,0) -> our window_size: LEFT, or None
    for -1 (unbounded)."""
    parts = text.strip("() ").split(",")
    try:
        left, right = (int(part) for part in (parts if len(parts) == 2 else [*parts, "0"]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LEFT,RIGHT or one number LEFT (integers, -1 unbounded)")
    if right != 0:
        raise argparse.ArgumentTypeError(f"{text}: RIGHT={right} must be 0 (a causal decoder attends to no later "
                                         "token)")
    if left < -1:
        raise argparse.ArgumentTypeError(f"{text}: LEFT={left} must be >= 0, or -1 for no window")
    return None if left == -1 else left


def _layer_pattern(text: str) -> int | list[int]:
    """--window-attn-skip-freq and --moe-layer-freq as Megatron takes them: an integer, or a list expression such
    as [1,1,1,0]*3 or ([1]*5+[0])*4 (quotes a bash array kept around it dropped), evaluated here without eval: list
    literals of integers joined by + and *."""
    def value(node: ast.AST) -> int | list:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.List):
            return [value(element) for element in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(node)

    try:
        pattern = value(ast.parse(text.strip().strip("'\""), mode="eval").body)
    except (SyntaxError, TypeError, ValueError):
        pattern = None
    if not isinstance(pattern, int) and not (isinstance(pattern, list)
                                             and all(type(layer) is int for layer in pattern)):
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer N or a list such as [1,1,1,0]*3 (integers, "
                                         "+ and *)")
    return pattern


# Fields whose flag is not a plain value of the field's type: Megatron's spellings, read into the field.
# --split as Megatron's Llama scripts pass it, quotes and all ("--split '99,1,0'" in a bash array).
_PARSERS = {"window_size": _window_pair, "window_attn_skip_freq": _layer_pattern, "moe_layer_freq": _layer_pattern,
            "split": lambda text: text.strip("'\"")}
# A `bool | None` field whose None is a per-family default gets, besides its flag (which writes
# True), one that writes False: Megatron only unties, and our llama family is untied by default.
_OPPOSITES = {"untie_embeddings_and_output_weights": "--tie-embeddings-and-output-weights"}


def _base_type(annotation: str | type) -> tuple[type, bool]:
    """(element type, is_list) of a field annotation such as 'int | None' or 'list[str] | None'."""
    hint = eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(
        hint, types.UnionType) else [hint]
    base = args[0]
    if typing.get_origin(base) is list:
        return typing.get_args(base)[0], True
    return base, False


def _flag_names(f: dataclasses.Field) -> list[str]:
    """`--field-name` and its aliases. A bool field that defaults to True gets `--no-field-name`
    instead, which turns it off (Megatron's convention, as in --no-masked-softmax-fusion)."""
    if f.default is True:
        return [_NEGATIONS.get(f.name, "--no-" + f.name.replace("_", "-"))]
    return ["--" + f.name.replace("_", "-"), *_ALIASES.get(f.name, [])]


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, only: tuple[str, ...] | None = None) -> None:
    """The flags of cls's fields (those named in `only`, if given): what pretrain_gpt.py takes,
    and what the tools that share some of its flags (tools/generate.py) take from it."""
    group = parser.add_argument_group(cls.__name__)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in _DERIVED or (only is not None and f.name not in only):
            continue
        names = _flag_names(f)
        base, is_list = _base_type(f.type)
        help_text = docs.get(f.name, "")
        if base is bool:
            group.add_argument(*names, dest=f.name, action="store_false" if f.default is True else "store_true",
                               default=argparse.SUPPRESS, help=help_text)
            if f.name in _OPPOSITES:
                group.add_argument(_OPPOSITES[f.name], dest=f.name, action="store_false", default=argparse.SUPPRESS,
                                   help=f"The opposite of {names[0]}.")
        elif f.name in _PARSERS:
            group.add_argument(*names, dest=f.name, type=_PARSERS[f.name], default=argparse.SUPPRESS,
                               metavar=f.name.upper(), help=help_text)
        else:
            group.add_argument(*names, dest=f.name, type=base, nargs="+" if is_list else None,
                               choices=_CHOICES.get(f.name), default=argparse.SUPPRESS,
                               metavar=f.name.upper(), help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_gpt.py", description="Pretrain a GPT with megatron_lite.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # No default here, so that parse_args sees whether the user named a preset: an unnamed one
    # only fills the fields a checkpoint given to --load does not.
    parser.add_argument("--model", default=argparse.SUPPRESS, choices=sorted(PRESETS),
                        help=f"Model preset; any model flag overrides its value (default: {DEFAULT_PRESET}).")
    for cls in (ModelConfig, ParallelConfig, TrainConfig):
        add_dataclass_flags(parser, cls)
    add_megatron_flags(parser)
    launch = parser.add_argument_group("Launch")
    for name, options in _LAUNCH_FLAGS.items():
        launch.add_argument(name, default=argparse.SUPPRESS, **options)
    return parser


class _ErrorRaisingParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class Launch:
    """How pretrain_gpt.py runs: for real, or as a dry run for a world of `world_size` ranks."""
    dry_run: bool = False
    world_size: int = 1
    gpu: str | None = None  # a dry run's GPU type (planner/hardware.py's GPUS), for the step time


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's


def parse_run(argv: list[str] | None = None) -> tuple[Launch, Config]:
    """pretrain_gpt.py's flags -> how it runs and the validated Config (for the dry run's world size,
    if it names one). Raises ConfigError with a one-line message on bad input."""
    given = _parse(argv)
    launch = {name: given.pop(name) for name in ("dry_run", "world_size", "gpu") if name in given}
    if launch and not launch.get("dry_run"):
        raise ConfigError(f"--{next(iter(launch)).replace('_', '-')} is only for --dry-run (a real run's world size "
                          "is torchrun's)")
    world_size = launch.get("world_size", _world_size())
    if world_size < 1:
        raise ConfigError(f"--world-size={world_size} must be at least 1")
    return Launch(launch.get("dry_run", False), world_size, launch.get("gpu")), _config(given, world_size)


def parse_args(argv: list[str] | None = None, world_size: int | None = None) -> Config:
    """Flags -> validated Config for `world_size` ranks (default: torchrun's WORLD_SIZE). Raises
    ConfigError with a one-line message on bad input."""
    given = _parse(argv)
    launch = [name for name in ("dry_run", "world_size", "gpu") if name in given]
    if launch:
        raise ConfigError(f"--{launch[0].replace('_', '-')} is pretrain_gpt.py's, not a flag here")
    return _config(given, _world_size() if world_size is None else world_size)


def _parse(argv: list[str] | None) -> dict:
    parser = build_parser()
    parser.__class__ = _ErrorRaisingParser
    return vars(parser.parse_args(argv))


def _config(given: dict, world_size: int) -> Config:
    """The parsed flags -> the validated Config of a run on `world_size` ranks."""
    preset_named = "model" in given
    preset = given.pop("model", DEFAULT_PRESET)
    if preset not in PRESETS:
        raise ConfigError(f"--model={preset} is unknown; allowed: {', '.join(sorted(PRESETS))}")
    model_kwargs = dict(PRESETS[preset])
    if not preset_named and "num_attention_heads" in given and "num_query_groups" not in given:
        # The unnamed preset's key/value heads were chosen for its own head count: with other
        # heads and no --num-query-groups, every head keeps its own (Megatron's default).
        model_kwargs.pop("num_query_groups", None)
    no_effect = _megatron_conventions(given, model_kwargs if preset_named else {})

    def pick(cls: type, base: dict) -> dict:
        names = {f.name for f in dataclasses.fields(cls)}
        return {**base, **{k: v for k, v in given.items() if k in names}}

    model_fields = pick(ModelConfig, {})
    if preset_named:
        model_fields = {**model_kwargs, **model_fields}
    model = ModelConfig(**pick(ModelConfig, model_kwargs))
    parallel = ParallelConfig(**pick(ParallelConfig, {}))
    per_chunk = parallel.num_layers_per_virtual_pipeline_stage
    if per_chunk is not None:
        stages = parallel.pipeline_model_parallel_size * per_chunk
        if per_chunk <= 0 or model.num_layers % stages:
            raise ConfigError(f"--num-layers={model.num_layers} is not divisible by pp * "
                              f"--num-layers-per-virtual-pipeline-stage = {stages}")
        parallel = dataclasses.replace(parallel, virtual_pipeline_model_parallel_size=model.num_layers // stages)
    if parallel.pipeline_schedule == "zbv" and parallel.virtual_pipeline_model_parallel_size is None:
        # ZB-V is defined on two chunks per rank (its V): the schedule alone says so.
        parallel = dataclasses.replace(parallel, virtual_pipeline_model_parallel_size=2)
    parallel = dataclasses.replace(parallel, data_parallel_size=axis_sizes(parallel, world_size)["dp"])
    if parallel.sequence_parallel and parallel.tensor_model_parallel_size == 1:
        if int(os.environ.get("RANK", "0")) == 0:
            print("WARNING: --sequence-parallel has no effect with --tensor-model-parallel-size=1; disabled",
                  flush=True)
        parallel = dataclasses.replace(parallel, sequence_parallel=False)
    config = Config(model=model, parallel=parallel, train=TrainConfig(**pick(TrainConfig, {})),
                    model_flags_given=tuple(sorted(model_fields)))  # validated whole as it is made
    if parallel.sharded_optimizer and parallel.data_parallel_size == 1 and int(os.environ.get("RANK", "0")) == 0:
        print("WARNING: --use-distributed-optimizer with data-parallel size 1 shards nothing; it runs unsharded",
              flush=True)
    load, save = config.train.load, config.train.save
    first_launch = save is not None and load is not None and os.path.abspath(load) == os.path.abspath(save)
    if load is not None and not os.path.isdir(load) and not (first_launch and not os.path.exists(load)):
        # `--save ck --load ck` that does not exist yet is the first launch of a job that
        # resumes itself when restarted (torchrun --max-restarts): it starts fresh, with a warning.
        raise ConfigError(f"--load={load} does not exist or is not a directory")
    if no_effect and int(os.environ.get("RANK", "0")) == 0:
        print(f"accepted, no effect here: {', '.join(no_effect)} (docs/megatron_compat.md says why)", flush=True)
    return config


def _megatron_conventions(given: dict, preset: dict) -> list[str]:
    """Megatron's flags that are not one field each, read into `given`: the family restating flags
    name, the fields Megatron's switches set, the tokenizer that --vocab-file implies, --train-samples in place
    of --train-iters, the flex dispatcher as alltoall, fsdp_dtensor checkpoints as torch_dist, ZeRO-3's overlap;
    the no-effect flags given are returned, for the start-up log."""
    settings = megatron_settings(given)
    if settings.family is not None:
        family = given.get("family", preset.get("family"))
        if family not in (None, settings.family):
            raise ConfigError(f"{settings.said_by} name the {settings.family} family, but the model is {family} "
                              "(--family or --model); drop one or make them agree")
        given["family"] = settings.family
    no_effect = settings.no_effect
    if given.get("moe_token_dispatcher_type") == "flex":  # Megatron's DeepEP/HybridEP backend: all-to-all here
        given["moe_token_dispatcher_type"] = "alltoall"
        no_effect = [*no_effect, "--moe-token-dispatcher-type flex (alltoall here)"]
    zero3 = given.get("data_parallel_sharding_strategy") == "optim_grads_params"
    if zero3 and given.pop("overlap_param_gather", False):
        # Megatron-FSDP scripts give both: ZeRO-3 prefetches the next layer's parameters in any case.
        no_effect = [*no_effect, "--overlap-param-gather (optim_grads_params gathers the next layer's parameters in "
                                 "the background anyway)"]
    if given.get("ckpt_format") == "fsdp_dtensor":  # Megatron-FSDP's DTensor checkpoint: DCP, as torch_dist is
        given["ckpt_format"] = "torch_dist"
        no_effect = [*no_effect, "--ckpt-format fsdp_dtensor (torch_dist here)"]
    if "train_samples" in given and "train_iters" in given:
        raise ConfigError("--train-iters and --train-samples exclude each other; choose one")
    if "tokenizer_type" not in given and ("vocab_file" in given or "merge_file" in given):
        given["tokenizer_type"] = "GPT2BPETokenizer"  # what Megatron's GPT scripts that name no type use
    return no_effect


def flags_markdown() -> str:
    """The flags table docs/flags.md shows (a test keeps the two in sync)."""
    rows = ["| flag | default | meaning |", "| --- | --- | --- |",
            f"| `--model` | `tiny` | preset: {', '.join(f'`{p}`' for p in PRESETS)}; flags override it |",
            *(f"| `{name}` | | {options['help']} |" for name, options in _LAUNCH_FLAGS.items())]
    for cls in (ModelConfig, ParallelConfig, TrainConfig):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in _DERIVED:
                continue
            names = _flag_names(f) + ([_OPPOSITES[f.name]] if f.name in _OPPOSITES else [])
            flags = ", ".join(f"`{n}`" for n in names)
            # The flag's own default: a --no-... flag is off unless given.
            default = False if f.default is True else f.default
            shown = "" if default in (None, dataclasses.MISSING) else f"`{default}`"
            rows.append(f"| {flags} | {shown} | {docs.get(f.name, '')} |")
    return "\n".join(rows + flags_markdown_rows())


if __name__ == "__main__":
    print(flags_markdown())
