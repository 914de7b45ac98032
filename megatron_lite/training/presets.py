"""The --model presets: the shapes of well-known models (random init; tools/convert_checkpoint.py from-hf imports
real weights), for demos, the planner and the benchmarks."""
from __future__ import annotations

# Shapes of well-known models. Vocabulary size is not part of a preset: it comes from the tokenizer.
PRESETS: dict[str, dict] = {
    # CPU demo: 200 steps in under a minute on two cores.
    "tiny": dict(family="llama", num_layers=4, hidden_size=128, num_attention_heads=4,
                 num_query_groups=2, seq_length=128),
    "tiny-gpt2": dict(family="gpt2", num_layers=4, hidden_size=128, num_attention_heads=4, seq_length=128),
    # GPT-2 small, 124M parameters.
    "gpt2-small": dict(family="gpt2", num_layers=12, hidden_size=768, num_attention_heads=12,
                       seq_length=1024, max_position_embeddings=1024),
    # TinyLlama-1.1B's shape.
    "llama-1b": dict(family="llama", num_layers=22, hidden_size=2048, num_attention_heads=32,
                     num_query_groups=4, ffn_hidden_size=5632, seq_length=2048),
    # CPU demo of a mixture of experts: the tiny shape with 8 experts, top-2, on every layer.
    "tiny-moe": dict(family="llama", num_layers=4, hidden_size=128, num_attention_heads=4,
                     num_query_groups=2, seq_length=128, num_experts=8, moe_router_topk=2,
                     moe_ffn_hidden_size=128, moe_aux_loss_coeff=1e-2),
    # A mixture of experts for benchmarks: llama-1b's attention, 8 experts of width 1408, top-2.
    "llama-moe": dict(family="llama", num_layers=16, hidden_size=2048, num_attention_heads=32,
                      num_query_groups=4, ffn_hidden_size=5632, seq_length=2048, num_experts=8, moe_router_topk=2,
                      moe_ffn_hidden_size=1408, moe_aux_loss_coeff=1e-2),
    # Llama-3-8B's and Llama-3-70B's shapes.
    "llama-8b": dict(family="llama", num_layers=32, hidden_size=4096, num_attention_heads=32,
                     num_query_groups=8, ffn_hidden_size=14336, seq_length=8192, rotary_base=500000.0),
    "llama3-70b": dict(family="llama", num_layers=80, hidden_size=8192, num_attention_heads=64,
                       num_query_groups=8, ffn_hidden_size=28672, seq_length=8192, rotary_base=500000.0),
    # The mixtures of experts Megatron-LM's examples train, as their config.json (random init here):
    # Mixtral-8x7B (8 experts of Mistral-7B's MLP, top-2) and Qwen3-30B-A3B (128 experts of width
    # 768, top-8, q/k norms, 128-wide heads); 4096-token samples, the RoPE table their whole context.
    "mixtral-8x7b": dict(family="llama", num_layers=32, hidden_size=4096, num_attention_heads=32,
                         num_query_groups=8, ffn_hidden_size=14336, seq_length=4096, max_position_embeddings=32768,
                         rotary_base=1000000.0, num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=14336,
                         moe_aux_loss_coeff=1e-2),
    "qwen3-30b-a3b": dict(family="llama", num_layers=48, hidden_size=2048, num_attention_heads=32,
                          num_query_groups=4, kv_channels=128, qk_layernorm=True, ffn_hidden_size=6144,
                          seq_length=4096, max_position_embeddings=40960, norm_epsilon=1e-6, rotary_base=1000000.0,
                          num_experts=128, moe_router_topk=8, moe_ffn_hidden_size=768, moe_aux_loss_coeff=1e-3),
    # DeepSeek-V3 (671B, 37B active), as its config.json: multi-latent attention (q latent 1536, kv latent 512,
    # heads of 128 + 64 rotated channels, values 128) with YaRN (factor 40 over 4096); 3 dense layers, then 58 of
    # 256 experts of width 2048 and one shared, top-8 of sigmoid scores within 4 of 8 groups, scaled by 2.5, with
    # the aux-loss-free expert bias; one multi-token prediction module.
    "deepseek-v3": dict(family="llama", num_layers=61, hidden_size=7168, num_attention_heads=128,
                        multi_latent_attention=True, q_lora_rank=1536, kv_lora_rank=512, qk_head_dim=128,
                        qk_pos_emb_head_dim=64, v_head_dim=128, qk_layernorm=True, ffn_hidden_size=18432,
                        seq_length=4096, max_position_embeddings=163840, norm_epsilon=1e-6,
                        rope_scaling_type="yarn", rope_scaling_factor=40.0,
                        rope_scaling_original_max_position_embeddings=4096, rope_scaling_mscale=1.0,
                        rope_scaling_mscale_all_dim=1.0, num_experts=256, moe_layer_freq=[0] * 3 + [1] * 58,
                        moe_ffn_hidden_size=2048, moe_shared_expert_intermediate_size=2048, moe_router_topk=8,
                        moe_router_score_function="sigmoid", moe_router_num_groups=8, moe_router_group_topk=4,
                        moe_router_topk_scaling_factor=2.5, moe_router_enable_expert_bias=True,
                        moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-4, mtp_num_layers=1),
    # Small tied models, as their config.json on the Hub (random init here; from-hf imports the weights).
    # Llama-3.2-1B: trained at 8192 tokens, its 131072 context by llama3 RoPE scaling (factor 32,
    # low/high freq factors 1 and 4: the fields' defaults).
    "llama3.2-1b": dict(family="llama", num_layers=16, hidden_size=2048, num_attention_heads=32,
                        num_query_groups=8, ffn_hidden_size=8192, seq_length=8192, max_position_embeddings=131072,
                        rotary_base=500000.0, rope_scaling_type="llama3", rope_scaling_factor=32.0,
                        rope_scaling_original_max_position_embeddings=8192,
                        untie_embeddings_and_output_weights=False),
    # Qwen2.5-0.5B (q/k/v biases) and Qwen3-0.6B (q/k norms, 128-wide heads): 4096-token samples,
    # the RoPE table their whole context.
    "qwen2.5-0.5b": dict(family="llama", num_layers=24, hidden_size=896, num_attention_heads=14,
                         num_query_groups=2, ffn_hidden_size=4864, add_qkv_bias=True, seq_length=4096,
                         max_position_embeddings=32768, norm_epsilon=1e-6, rotary_base=1000000.0,
                         untie_embeddings_and_output_weights=False),
    "qwen3-0.6b": dict(family="llama", num_layers=28, hidden_size=1024, num_attention_heads=16,
                       num_query_groups=8, kv_channels=128, ffn_hidden_size=3072, qk_layernorm=True,
                       seq_length=4096, max_position_embeddings=40960, norm_epsilon=1e-6, rotary_base=1000000.0,
                       untie_embeddings_and_output_weights=False),
    # SmolLM-135M: a 2048-token context.
    "smollm-135m": dict(family="llama", num_layers=30, hidden_size=576, num_attention_heads=9,
                        num_query_groups=3, ffn_hidden_size=1536, seq_length=2048,
                        untie_embeddings_and_output_weights=False),
    # Mistral-7B-v0.1: untied, 8192-token samples, each token attending to the 4095 before it
    # (its sliding_window of 4096 counts the token itself).
    "mistral-7b": dict(family="llama", num_layers=32, hidden_size=4096, num_attention_heads=32,
                       num_query_groups=8, ffn_hidden_size=14336, seq_length=8192, max_position_embeddings=32768,
                       window_size=4095),
}

DEFAULT_PRESET = "tiny"
