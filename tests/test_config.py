"""Bad flags are refused with one message naming the flag, its value and what is allowed."""
from __future__ import annotations

import dataclasses

import pytest

from megatron_lite.config import ConfigError
from megatron_lite.planner.parameters import count_parameters
from megatron_lite.training.arguments import PRESETS, parse_args


@pytest.mark.parametrize("argv, message", [
    (["--hidden-size", "0"], r"--hidden-size=0 must be a positive number"),
    (["--num-layers", "-2"], r"--num-layers=-2 must be a positive number"),
    (["--hidden-size", "100", "--num-attention-heads", "3"],
     r"--hidden-size=100 is not divisible by --num-attention-heads=3"),
    (["--num-attention-heads", "4", "--num-query-groups", "3"],
     r"--num-attention-heads=4 is not divisible by --num-query-groups=3"),
    (["--global-batch-size", "10", "--micro-batch-size", "4"],
     r"--global-batch-size=10 is not divisible by --micro-batch-size=4 .* nearest valid values: 8 or 12"),
    (["--model", "tiny-gpt2", "--seq-length", "256", "--max-position-embeddings", "128"],
     r"--seq-length=256 exceeds the gpt2 position table --max-position-embeddings=128"),
    (["--model", "gpt-5"], r"--model.*invalid choice: 'gpt-5'"),
    (["--load", "/nonexistent/ckpt"], r"--load=/nonexistent/ckpt does not exist"),
    (["--lr", "1e-4", "--min-lr", "1e-3"], r"--min-lr=0.001 must not exceed --lr=0.0001"),
    (["--split", "98,2"], r"--split=98,2 must be three"),
    (["--hidden-dropout", "1.5"], r"--hidden-dropout=1.5 must be in \[0, 1\)"),
    (["--micro-batch-size", "0"], r"--micro-batch-size=0 must be a positive number"),
    (["--window-size", "128,5"], r"--window-size: 128,5: RIGHT=5 must be 0 \(a causal decoder attends to no later"),
    (["--window-size", "-2"], r"--window-size: -2: LEFT=-2 must be >= 0, or -1 for no window"),
    (["--window-attn-skip-freq", "2"], r"--window-attn-skip-freq=2 needs --window-size"),
    (["--window-size", "8", "--window-attn-skip-freq", "[1,0]*3"],
     r"--window-attn-skip-freq=\[1, 0, 1, 0, 1, 0\] must give each of the --num-layers=4 layers 1 \(slide\) or 0"),
    (["--window-size", "8", "--window-attn-skip-freq", "__import__('os')"],
     r"--window-attn-skip-freq: .* is not an integer N or a list such as \[1,1,1,0\]\*3"),
])
def test_bad_flags_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_megatron_window_flags() -> None:
    """--window-size is Megatron's LEFT,RIGHT (one number N is N,0; LEFT -1 no window);
    --window-attn-skip-freq N makes layers N, 2N, ... (counting from 1) attend fully, and a list
    pattern gives each layer 1 (slide) or 0 (full)."""
    assert parse_args(["--window-size", "8"]).model == parse_args(["--window-size", "8,0"]).model
    assert parse_args(["--window-size", "8"]).model.layer_windows == [8] * 4
    assert parse_args(["--model", "mistral-7b", "--window-size=-1,0"]).model.window_size is None
    assert parse_args(["--window-size", "8", "--window-attn-skip-freq", "2"]).model.layer_windows == [8, None] * 2
    model = parse_args(["--num-layers", "8", "--window-size", "8", "--window-attn-skip-freq", "([1]*3+[0])*2"]).model
    assert model.window_attn_skip_freq == [1, 1, 1, 0] * 2 and model.layer_windows == [8, 8, 8, None] * 2


def test_presets_and_overrides() -> None:
    config = parse_args(["--model", "gpt2-small", "--num-layers", "2"])
    assert config.model.family == "gpt2" and config.model.hidden_size == 768 and config.model.num_layers == 2
    assert config.model.ffn_hidden_size == 4 * 768 and config.model.tie_embeddings
    for name in PRESETS:
        parse_args(["--model", name]).model.validate()


# Published sizes (model cards), vocabularies and tying (config.json) of the real models the presets copy.
REAL_MODELS = {"llama3.2-1b": (1.23e9, 128256, True), "qwen2.5-0.5b": (0.49e9, 151936, True),
               "qwen3-0.6b": (0.6e9, 151936, True), "smollm-135m": (135e6, 49152, True),
               "mistral-7b": (7.24e9, 32000, False), "llama3-70b": (70.6e9, 128256, False),
               "mixtral-8x7b": (46.7e9, 32000, False), "qwen3-30b-a3b": (30.5e9, 151936, False),
               # 671B and the 14B of its multi-token prediction module, whose embedding and head (1.9B) are
               # copies of the main model's in the release and shared here: 0.3 % under.
               "deepseek-v3": (685e9, 129280, False)}


@pytest.mark.parametrize("name", REAL_MODELS)
def test_real_model_presets_have_their_models_parameter_count(name: str) -> None:
    size, vocab, tied = REAL_MODELS[name]
    model = dataclasses.replace(parse_args(["--model", name]).model, vocab_size=vocab)
    assert model.tie_embeddings == tied
    assert count_parameters(model) == pytest.approx(size, rel=0.01)


def test_zbv_alone_runs_two_chunks_per_rank() -> None:
    """ZB-V is defined on two model chunks per rank: --pipeline-schedule zbv needs no --vpp 2."""
    config = parse_args(["--pp", "2", "--pipeline-schedule", "zbv", "--micro-batch-size", "4"], world_size=2)
    assert config.parallel.vpp == 2 and config.parallel.v_shape


def test_tie_flags() -> None:
    """Megatron's flag unties; ours ties; neither: the family's convention."""
    assert [parse_args(argv).model.untie_embeddings_and_output_weights for argv in (
        [], ["--untie-embeddings-and-output-weights"], ["--tie-embeddings-and-output-weights"])] == [None, True, False]
    assert not parse_args([]).model.tie_embeddings and parse_args(["--model", "tiny-gpt2"]).model.tie_embeddings
    assert parse_args(["--tie-embeddings-and-output-weights"]).model.tie_embeddings


def test_llama_defaults() -> None:
    model = parse_args([]).model
    assert model.family == "llama" and model.num_query_groups == 2
    assert model.ffn_hidden_size % 64 == 0 and model.ffn_hidden_size >= 8 * model.hidden_size // 3


def test_padded_vocab() -> None:
    model = parse_args([]).updated(model={"vocab_size": 258}).model
    assert model.padded_vocab_size() == 384
    assert model.padded_vocab_size(tp=4) == 512


@pytest.mark.parametrize("world, argv, message", [
    (4, ["--tp", "3"], r"world size 4 is not divisible by tensor-model-parallel size 3 x context-parallel size 1 x "
                       r"pipeline-model-parallel size 1 = 3"),
    (4, ["--cp", "3"], r"world size 4 is not divisible by .* context-parallel size 3 .* = 3"),
    (2, ["--cp", "2", "--seq-length", "30"], r"--seq-length=30 is not divisible by 2 x --context-parallel-size=2 = 4"),
    (4, ["--cp", "2", "--tp", "2", "--sp", "--seq-length", "36"],
     r"--seq-length=36 is not divisible by 2 x --context-parallel-size=2 x --tensor-model-parallel-size=2 "
     r"\(sequence parallel\) = 8"),
    (4, ["--cp", "4", "--cp-comm-type", "a2a", "--num-attention-heads", "8", "--num-query-groups", "2"],
     r"--num-query-groups=2 is not divisible by tp x cp = 4, which --cp-comm-type=a2a needs"),
    (2, ["--cp", "2", "--attention-dropout", "0.1"],
     r"--attention-dropout=0.1 is not supported with --context-parallel-size=2; use 0"),
    (2, ["--cp", "2", "--cp-comm-type", "ring"], r"argument --cp-comm-type: invalid choice: 'ring'"),
    (4, ["--tp", "4", "--num-attention-heads", "4", "--num-query-groups", "2"],
     r"--num-query-groups=2 is not divisible by --tensor-model-parallel-size=4"),
    (8, ["--tp", "8", "--num-attention-heads", "4", "--num-query-groups", "4"],
     r"--num-attention-heads=4 is not divisible by --tensor-model-parallel-size=8"),
    (2, ["--tp", "2", "--ffn-hidden-size", "99"],
     r"--ffn-hidden-size=99 is not divisible by --tensor-model-parallel-size=2"),
    (2, ["--tp", "2", "--sp", "--seq-length", "33"],
     r"--seq-length=33 is not divisible by --tensor-model-parallel-size=2, which --sequence-parallel needs"),
    (2, ["--pp", "2", "--pipeline-schedule", "zbv", "--vpp", "1"],
     r"--pipeline-schedule=zbv places two model chunks per rank in a V; "
     r"set --virtual-pipeline-model-parallel-size 2 \(it is 1\)"),
    (2, ["--pp", "2", "--vpp", "2", "--pipeline-schedule", "zb-h1"],
     r"--pipeline-schedule=zb-h1 cannot run 2 model chunks per rank; use --pipeline-schedule interleaved or zbv"),
    (4, ["--pp", "4", "--vpp", "2", "--pipeline-schedule", "zbv", "--num-layers", "8", "--global-batch-size", "12",
         "--micro-batch-size", "2"],
     r"--pipeline-schedule=zbv needs at least 2 x pp - 1 = 7 microbatches to fill its V; it has 6 = global batch 12"),
    (4, ["--pp", "2", "--pipeline-schedule", "zb-h1", "--data-parallel-sharding-strategy", "optim_grads"],
     r"--pipeline-schedule=zb-h1 with --data-parallel-sharding-strategy=optim_grads is not supported yet"),
])
def test_bad_parallel_layouts_are_refused(monkeypatch, world: int, argv: list[str], message: str) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_sequence_parallel_without_tp_is_disabled(capsys) -> None:
    assert parse_args(["--sp"]).parallel.sequence_parallel is False
    assert "WARNING: --sequence-parallel has no effect" in capsys.readouterr().out


def test_data_parallel_size_is_derived(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert parse_args(["--tp", "2", "--global-batch-size", "32"]).parallel.data_parallel_size == 4


@pytest.mark.parametrize("world, argv, message", [
    (4, ["--pp", "4", "--num-layers", "6"], r"--num-layers=6 is not divisible by pp\*vpp=4\*1=4"),
    (4, ["--pp", "4", "--vpp", "2", "--num-layers", "4"], r"--num-layers=4 is not divisible by pp\*vpp=4\*2=8"),
    (4, ["--pp", "4", "--vpp", "2", "--num-layers", "8", "--global-batch-size", "48"],
     r"^the interleaved schedule needs the number of microbatches \(6\) to be a multiple of "
     r"--pipeline-model-parallel-size=4; 6 = global batch 48 / \(micro batch 8 x dp 1\)$"),
    (4, ["--pp", "4", "--vpp", "2", "--num-layers", "8", "--micro-batch-size", "1", "--global-batch-size", "8",
         "--microbatch-group-size-per-virtual-pipeline-stage", "3"],
     r"^--microbatch-group-size-per-virtual-pipeline-stage=3 must lie between --pipeline-model-parallel-size=4 and "
     r"the number of microbatches \(8\); 8 = global"),
    (2, ["--pp", "2", "--vpp", "2", "--micro-batch-size", "1", "--global-batch-size", "4",
         "--microbatch-group-size-per-virtual-pipeline-stage", "3"],
     r"^the interleaved schedule needs the number of microbatches \(4\) to be a multiple of "
     r"--microbatch-group-size-per-virtual-pipeline-stage=3 or to leave a remainder of at least "
     r"--pipeline-model-parallel-size=2 \(it leaves 1\); 4 = global"),
    (2, ["--pp", "2", "--vpp", "2", "--microbatch-group-size-per-virtual-pipeline-stage", "0"],
     r"^--microbatch-group-size-per-virtual-pipeline-stage=0 must be a positive number$"),
    (2, ["--pp", "2", "--microbatch-group-size-per-virtual-pipeline-stage", "2"],
     r"^--microbatch-group-size-per-virtual-pipeline-stage=2 is for the interleaved schedule only"),
    (1, ["--vpp", "2"],
     r"--virtual-pipeline-model-parallel-size=2 needs --pipeline-model-parallel-size > 1 \(it is 1\)"),
    (2, ["--pp", "2", "--vpp", "2", "--pipeline-schedule", "1f1b"],
     r"--pipeline-schedule=1f1b cannot run 2 model chunks"),
    (2, ["--pp", "2", "--pipeline-schedule", "interleaved"],
     r"interleaved needs --virtual-pipeline-model-parallel-size > 1"),
    (2, ["--pp", "2", "--num-layers-per-virtual-pipeline-stage", "3"],
     r"--num-layers=4 is not divisible by pp \* --num-layers-per-virtual-pipeline-stage = 6"),
])
def test_bad_pipeline_layouts_are_refused(monkeypatch, world: int, argv: list[str], message: str) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_interleaved_takes_a_non_multiple_of_pp_in_larger_groups(monkeypatch) -> None:
    # Megatron's example: pp 2, groups of 3, 5 microbatches (a last group of 2 = pp).
    monkeypatch.setenv("WORLD_SIZE", "2")
    parallel = parse_args(["--pp", "2", "--vpp", "2", "--micro-batch-size", "1", "--global-batch-size", "5",
                           "--microbatch-group-size-per-virtual-pipeline-stage", "3"]).parallel
    assert parallel.microbatch_group_size == 3
    assert parse_args(["--pp", "2", "--vpp", "2"]).parallel.microbatch_group_size == 2


def test_layers_per_virtual_stage_derives_vpp(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    parallel = parse_args(["--pp", "2", "--num-layers", "8", "--num-layers-per-virtual-pipeline-stage", "2"]).parallel
    assert parallel.vpp == 2 and parallel.schedule == "interleaved"
