"""The model: shapes of both families, deterministic init, and that it can learn."""
from __future__ import annotations

import pytest
import torch

from helpers.tiny import tiny_model
from megatron_lite.model.gpt import GPTModel, init_weights
from megatron_lite.model.initialization import standard_normal
from megatron_lite.planner.flops import flops_per_step, muon_matrices
from megatron_lite.planner.parameters import count_parameters


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_output_shapes(family: str) -> None:
    config = tiny_model(family)
    model = GPTModel(config)
    init_weights(model, config, seed=0)
    tokens = torch.randint(0, config.vocab_size, (3, config.seq_length))
    assert model(tokens).shape == (3, config.seq_length, config.vocab_size)
    loss = model(tokens, tokens)
    assert loss.shape == (3, config.seq_length) and loss.dtype == torch.float32
    # At init the predictions are near uniform over the vocabulary.
    assert abs(loss.mean().item() - torch.log(torch.tensor(float(config.vocab_size))).item()) < 0.5


def test_family_structure() -> None:
    llama, gpt2 = GPTModel(tiny_model("llama")), GPTModel(tiny_model("gpt2"))
    llama_names = dict(llama.named_parameters())
    gpt2_names = dict(gpt2.named_parameters())
    assert "output_layer.weight" in llama_names and "output_layer.weight" not in gpt2_names
    assert "position_embeddings.weight" in gpt2_names and "position_embeddings.weight" not in llama_names
    assert "layers.0.input_layernorm.bias" in gpt2_names and "layers.0.input_layernorm.bias" not in llama_names
    # GQA: 4 query heads of dim 8 + 2 key and 2 value heads.
    assert llama_names["layers.0.self_attention.linear_qkv.weight"].shape == ((4 + 2 * 2) * 8, 32)
    assert llama_names["layers.0.mlp.linear_fc1.weight"].shape[0] == 2 * tiny_model("llama").ffn_hidden_size


def test_init_is_by_name_and_scaled() -> None:
    config = tiny_model("llama", num_layers=8)
    a, b = GPTModel(config), GPTModel(config)
    init_weights(a, config, seed=3)
    init_weights(b, config, seed=3)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    proj = a.layers["0"].self_attention.linear_proj.weight.std().item()
    qkv = a.layers["0"].self_attention.linear_qkv.weight.std().item()
    assert proj == pytest.approx(qkv / 4.0, rel=0.15)  # std / sqrt(2 * 8 layers)
    assert not torch.equal(a.layers["0"].mlp.linear_fc1.weight, a.layers["1"].mlp.linear_fc1.weight)


def test_initial_values_are_standard_normal_and_a_function_of_position() -> None:
    """The counter-based generator: normal moments, the same value at a position whichever slice
    asks for it (what lets a rank draw only its shard), other keys other values, and positions
    past 2^32 (a table larger than 4G elements) distinct from those below."""
    index = torch.arange(1 << 18)
    z = standard_normal(index, key=7)
    assert abs(z.mean().item()) < 0.01 and z.std().item() == pytest.approx(1.0, abs=0.01)
    assert (z ** 4).mean().item() == pytest.approx(3.0, abs=0.1)  # the normal's kurtosis
    assert (z.abs() > 3).float().mean().item() == pytest.approx(0.0027, rel=0.2)  # both tails
    assert torch.equal(standard_normal(index[12345:12399], 7), z[12345:12399])
    assert torch.equal(standard_normal(index.view(512, 512)[::3, 5:77], 7), z.view(512, 512)[::3, 5:77])
    assert not torch.equal(standard_normal(index[:64], 8), z[:64])
    assert not torch.equal(standard_normal(index[:64] + (1 << 32), 7), z[:64])


def test_causal() -> None:
    config = tiny_model("llama")
    model = GPTModel(config)
    init_weights(model, config, seed=0)
    tokens = torch.randint(0, config.vocab_size, (1, config.seq_length))
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % config.vocab_size
    out_a, out_b = model(tokens), model(changed)
    assert torch.equal(out_a[:, :-1], out_b[:, :-1])
    assert not torch.equal(out_a[:, -1], out_b[:, -1])


def test_model_flops_of_a_sliding_window_count_the_keys_each_query_sees() -> None:
    """Megatron's formula counts s keys per query for the scores and weighted sum; with a
    window, window + 1 keys (a window wider than the sequence changes nothing), on the layers
    that slide: with one of the two layers sliding, half the saving."""
    full = tiny_model(seq_length=64)
    h, s, layers = full.hidden_size, full.seq_length, full.num_layers
    windowed = flops_per_step(tiny_model(seq_length=64, window_size=15), 2)
    assert flops_per_step(full, 2) - windowed == pytest.approx(12.0 * 2 * s * layers * h * (s - 16))
    assert flops_per_step(tiny_model(seq_length=64, window_size=100), 2) == flops_per_step(full, 2)
    one_layer = flops_per_step(tiny_model(seq_length=64, window_size=15, window_attn_skip_freq=[0, 1]), 2)
    assert flops_per_step(full, 2) - one_layer == pytest.approx(12.0 * 2 * s * h * (s - 16))


@pytest.mark.parametrize("q_lora_rank, qk_layernorm", [(16, True), (None, False)])
def test_multi_latent_attention_parameters_and_flops_by_hand(q_lora_rank: int | None, qk_layernorm: bool) -> None:
    """The planner counts the model's parameters and Muon's matrices (each MLA weight whole); its model FLOPs
    count MLA's projections, the scores over the query/key width (qk + pos channels) and the weighted sum over
    the value width: the model's math, not the padded width attention runs at."""
    config = tiny_model(num_layers=1, num_query_groups=4, ffn_hidden_size=64, vocab_size=256,
                        make_vocab_size_divisible_by=1, multi_latent_attention=True, q_lora_rank=q_lora_rank,
                        kv_lora_rank=8, qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=6, qk_layernorm=qk_layernorm)
    model = GPTModel(config)
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())
    weights = [p for name, p in model.named_parameters() if "self_attention" in name and p.ndim == 2]
    assert muon_matrices(config)[:-3] == [tuple(p.shape) for p in weights]  # then the MLP's gate, up and fc2
    b, s, h, heads, f, vocab = 2, 16, 32, 4, 64, 256
    per_token_fwd = (2 * sum(p.numel() for p in weights) + 2 * s * heads * (8 + 4) + 2 * s * heads * 6
                     + 3 * 2 * h * f + 2 * h * vocab)
    assert flops_per_step(config, b) == pytest.approx(3 * b * s * per_token_fwd, rel=1e-12)
