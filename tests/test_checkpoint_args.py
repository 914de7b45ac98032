"""--load takes the model arguments from the checkpoint: the ones the user leaves unset are adopted
(the resumed run computes what the saved one did), the ones that contradict it are refused."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
import transformers

from helpers.commands import ROOT, run_command
from helpers.tiny import tiny_config
from megatron_lite.checkpointing import adopt_checkpoint_model_args, read_checkpoint
from megatron_lite.checkpointing.reshard import load_weights
from megatron_lite.config import ConfigError
from megatron_lite.model.gpt import GPTModel
from megatron_lite.training.arguments import parse_args
from megatron_lite.training.loop import pretrain

sys.path.insert(0, str(ROOT / "tools"))
import convert_checkpoint  # noqa: E402

# tiny_config's training settings as flags; no model flag at all.
TRAIN_FLAGS = ["--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
               "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "1", "--log-interval", "1",
               "--eval-interval", "0"]
CASES = {  # family: (model fields unlike the CLI's defaults, flags that contradict them)
    "llama": (dict(rotary_base=500000.0, norm_epsilon=1e-6), [("--rotary-base", "10000"), ("--norm-epsilon", "1e-5")]),
    "gpt2": (dict(norm_epsilon=1e-6), [("--family", "llama")]),
}


@pytest.mark.parametrize("family", list(CASES))
def test_unset_model_flags_are_adopted_and_contradictions_refused(family: str, tmp_path: Path, capsys) -> None:
    fields, contradictions = CASES[family]
    straight = pretrain(tiny_config(family, train_iters=3, model=fields))["losses"]
    assert straight != pretrain(tiny_config(family, train_iters=3))["losses"]  # the fields change the function
    pretrain(tiny_config(family, train_iters=3, exit_interval=1, save=str(tmp_path), model=fields))
    capsys.readouterr()

    assert pretrain(parse_args(TRAIN_FLAGS + ["--load", str(tmp_path)]))["losses"] == straight[1:]
    adopted = capsys.readouterr().out
    assert f"> model arguments from checkpoint {tmp_path / 'iter_0000001'}: " in adopted
    for name, value in fields.items():
        assert f"--{name.replace('_', '-')}={value}" in adopted
    for flag, value in contradictions:
        with pytest.raises(ConfigError, match=rf"{flag}=\S+ contradicts checkpoint .*iter_0000001, saved with "
                                              f"{flag}=.*; leave {flag} out to continue with the checkpoint's value"):
            pretrain(parse_args(TRAIN_FLAGS + ["--load", str(tmp_path), flag, value]))


def test_contradiction_is_one_line_and_exit_2(tmp_path: Path) -> None:
    pretrain(tiny_config(train_iters=1, save=str(tmp_path), model=dict(rotary_base=500000.0)))
    result = run_command([sys.executable, str(ROOT / "pretrain_gpt.py"), *TRAIN_FLAGS, "--load", str(tmp_path),
                          "--rotary-base", "10000"])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pretrain_gpt.py: error: --rotary-base=10000.0 contradicts")


def test_hf_import_trains_the_function_transformers_computes(tmp_path: Path) -> None:
    """A Llama with rope_theta 500000 and rms_norm_eps 1e-6, imported and loaded with no model flag."""
    hf_config = transformers.LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         rope_theta=500000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert convert_checkpoint.main(["from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours"),
                                    "--make-vocab-size-divisible-by", "8"]) == 0

    config = parse_args(["--load", str(tmp_path / "ours"), "--seq-length", "16"])
    config = config.updated(model={"vocab_size": 258})  # what pretrain takes from the byte tokenizer
    config = adopt_checkpoint_model_args(config, tmp_path / "ours", 0)
    assert (config.model.rotary_base, config.model.norm_epsilon) == (500000.0, 1e-6)
    model = GPTModel(config.model)
    load_weights(read_checkpoint(tmp_path / "ours", 0).model, [model])
    tokens = torch.randint(0, 258, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens), hf(tokens).logits, rtol=0, atol=1e-4)


def test_adopted_arguments_meet_every_check_of_the_config(tmp_path: Path) -> None:
    """An adopted field is validated with the whole Config, as if it had been a flag: experts from
    the checkpoint under a parameter server are refused in the server's own words."""
    pretrain(tiny_config(train_iters=1, save=str(tmp_path), model=dict(num_experts=2)))
    config = parse_args(TRAIN_FLAGS + ["--load", str(tmp_path), "--data-parallel-mode", "parameter-server"])
    with pytest.raises(ConfigError, match=r"^--data-parallel-mode=parameter-server does not support --num-experts=2 "):
        pretrain(config)


def test_config_is_immutable_and_updated_whole() -> None:
    config = tiny_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.lr = 1.0
    with pytest.raises(ConfigError, match="parameter-server does not support --fp16"):
        config.updated(parallel={"data_parallel_mode": "parameter-server"}, train={"fp16": True})
    assert config.updated(train={"lr": 1.0}).train.lr == 1.0 and config.train.lr != 1.0
