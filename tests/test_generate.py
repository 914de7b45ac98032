"""tools/generate.py and megatron_lite/inference/: greedy continuations of a trained tiny model
equal transformers' generate on its Hugging Face export, token for token, from the tp 1
checkpoint, from the same weights resharded to tp 2 x pp 2, and from the export itself."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers

import pretrain_gpt
from megatron_lite.inference.generation import generate, load_model
from megatron_lite.inference.sampling import SamplingParams, sample
from megatron_lite.model.kv_cache import InferenceParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import convert_checkpoint  # noqa: E402
import generate as generate_tool  # noqa: E402

SHAPE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
         "--micro-batch-size", "8", "--global-batch-size", "8", "--lr", "1e-2", "--min-lr", "1e-3",
         "--log-interval", "50", "--eval-interval", "0",
         # Which of PROMPTS a family continues with more than one byte after 150 steps depends on the seed
         # and on the CPU's rounding (varied_greedy takes the first that does).
         "--seed", "1"]
# Python source: what the built-in corpus (the stdlib) is made of, so the model has an opinion.
PROMPT = "def __init__(self"
PROMPTS = (PROMPT, "import os\n", "    return self.", "class ", "# ")
GREEDY = SamplingParams(greedy=True)
EOD = 256  # the byte tokenizer's


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def checkpoints(request, tmp_path_factory) -> dict[str, Path]:
    """The same trained weights three ways: tp 1, resharded to tp 2 x pp 2, and exported to HF."""
    root = tmp_path_factory.mktemp(request.param)
    groups = "2" if request.param == "llama" else "4"  # GPT-2 has no grouped-query attention
    assert pretrain_gpt.main(SHAPE + ["--num-query-groups", groups, "--family", request.param, "--train-iters", "150",
                                              "--save", str(root / "tp1")]) == 0
    assert convert_checkpoint.main(["reshard", "--load", str(root / "tp1"), "--out", str(root / "tp2pp2"),
                                    "--tp", "2", "--pp", "2"]) == 0
    assert convert_checkpoint.main(["to-hf", "--load", str(root / "tp1"), "--out", str(root / "hf")]) == 0
    return {name: root / name for name in ("tp1", "tp2pp2", "hf")}


def transformers_greedy(hf_dir: Path, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos)
    return out[0, len(prompt):].tolist()


def varied_greedy(hf_dir: Path) -> tuple[list[int], list[int]]:
    """The first of PROMPTS that transformers continues with more than one distinct token, and that continuation.
    A model this small often repeats one byte, and which prompt it does so after depends on the CPU's float
    rounding over 150 steps (its matmul kernels); a comparison of one repeated token would check little."""
    for text in PROMPTS:
        prompt = list(text.encode())
        expected = transformers_greedy(hf_dir, prompt, 40, EOD)
        if len(set(expected)) > 1:
            return prompt, expected
    raise AssertionError(f"every prompt of {PROMPTS} is continued with one repeated token")


def test_greedy_equals_transformers_from_every_layout(checkpoints: dict[str, Path]) -> None:
    prompt, expected = varied_greedy(checkpoints["hf"])
    assert len(expected) == 40
    for name, path in checkpoints.items():
        model, _ = load_model(path)
        assert generate(model, prompt, 40, GREEDY, EOD) == expected, name
    # Stopping at the end of a document: call the fifth token chosen the end, and both stop after it.
    eod = expected[4]
    stop = expected.index(eod) + 1
    model, _ = load_model(checkpoints["tp2pp2"])
    assert generate(model, prompt, 40, GREEDY, eod) == expected[:stop]
    assert transformers_greedy(checkpoints["hf"], prompt, 40, eod) == expected[:stop]


def test_generate_tool_prints_prompt_and_continuation_only(checkpoints: dict[str, Path],
                                                           capsys: pytest.CaptureFixture) -> None:
    model, _ = load_model(checkpoints["tp1"])
    ids = generate(model, list(PROMPT.encode()), 30, GREEDY, EOD)
    for load, greedy in ((checkpoints["tp2pp2"], "--greedy"), (checkpoints["hf"], "--temperature=0")):
        assert generate_tool.main(["--load", str(load), "--prompt", PROMPT, "--max-new-tokens", "30", greedy]) == 0
        out, err = capsys.readouterr()
        assert out == PROMPT + bytes(i for i in ids if i < 256).decode("utf-8", errors="replace") + "\n"
        assert "tokens/s), stopped at --max-new-tokens=30" in err
    # Sampling is reproducible from its seed, and another seed gives another continuation.
    sampled = []
    for seed in ("1", "1", "2"):
        assert generate_tool.main(["--load", str(checkpoints["tp1"]), "--prompt", PROMPT, "--max-new-tokens", "30",
                                   "--temperature", "1.5", "--top-k", "50", "--seed", seed]) == 0
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1] != sampled[2]


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "60"], "the prompt's 17 tokens + --max-new-tokens=60 must be between 1 and the model's "
                                 "context of 64 positions"),
    (["--top-p", "1.5"], "--top-p=1.5 must be within [0, 1] (0: no cut)"),
    (["--temperature", "-1"], "--temperature=-1.0 must be positive, or 0 for the most likely token"),
    (["--ckpt-step", "7"], "--ckpt-step=7: "),
])
def test_bad_input_is_one_line(checkpoints: dict[str, Path], capsys: pytest.CaptureFixture,
                               flags: list[str], message: str) -> None:
    assert generate_tool.main(["--load", str(checkpoints["tp1"]), "--prompt", PROMPT, *flags]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") - err.count("> loaded") == 1
    assert err.splitlines()[-1].startswith("generate.py: error: " + message)


def test_kv_cache_matches_the_full_forward(checkpoints: dict[str, Path]) -> None:
    """Logits computed a few tokens at a time over the cache equal one forward over them all."""
    model, _ = load_model(checkpoints["tp1"])
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        cache, parts = InferenceParams(2, 40), []
        for piece in tokens.split([17, 1, 1, 21], dim=1):
            parts.append(model(piece, inference_params=cache))
            cache.sequence_len_offset += piece.shape[1]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_sampling_keeps_to_top_k_and_top_p() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(4000, 1)
    probs = logits[0].softmax(-1)
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, SamplingParams(greedy=True)).unique().tolist() == [0]
    assert sample(logits, SamplingParams(top_k=1), gen).unique().tolist() == [0]
    top3 = sample(logits, SamplingParams(top_k=3), gen)
    assert set(top3.tolist()) == {0, 1, 2}
    # The nucleus of 0.8: the fewest most likely tokens whose probability reaches it.
    nucleus = int((probs.cumsum(-1) < 0.8).sum()) + 1
    assert set(sample(logits, SamplingParams(top_p=0.8), gen).tolist()) == set(range(nucleus))
    # Within the cut, tokens come as often as their renormalised probability says.
    counts = torch.bincount(top3, minlength=6)[:3].double() / len(top3)
    torch.testing.assert_close(counts, probs[:3].double() / probs[:3].sum(), atol=0.03, rtol=0)
    cold = sample(logits, SamplingParams(temperature=0.05), gen)
    assert (cold == 0).double().mean() > 0.99
