"""The GPT model: embedding, transformer layers, final norm, output layer and loss."""
from __future__ import annotations

import contextlib
import functools
import math
import zlib
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite import parallel_state
from megatron_lite.config import ModelConfig
from megatron_lite.model.initialization import normal_range_
from megatron_lite.model.kv_cache import InferenceParams
from megatron_lite.model.mtp import MultiTokenPrediction
from megatron_lite.model.norms import build_norm, is_norm_weight
from megatron_lite.model.ops import Ops, select_ops
from megatron_lite.model.rope import rotary_tables
from megatron_lite.model.transformer import TransformerLayer
from megatron_lite.param_unit import ParamUnit
from megatron_lite.placement import place, placement, with_partial_grads
from megatron_lite.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    enter_tensor_parallel_region,
    mark_sequence_parallel,
)
from megatron_lite.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from megatron_lite.tensor_parallel.random import checkpoint, get_rng_tracker


class GPTModel(nn.Module):
    """Decoder-only transformer of either family (see ModelConfig.family), sharded over the tp group.

    A pipeline stage builds only its part: the layers numbered `layer_numbers` (global
    numbers, so parameter names and their init match the whole model), the embedding if it
    is the first stage (pre_process) and the final norm, output layer and loss if it is the
    last (post_process). With sequence_parallel the residual stream between the embedding
    and the output layer holds seq/tp tokens per rank.
    """

    def __init__(self, config: ModelConfig, sequence_parallel: bool = False, layer_numbers: range | None = None,
                 pre_process: bool = True, post_process: bool = True, ops: Ops | None = None) -> None:
        """`ops`: what the layers compute with (default: ModelConfig.fused_kernels' choice); a
        parallelism that changes how an op runs (context parallelism's attention) hands its own."""
        super().__init__()
        self.config = config
        self.sequence_parallel = sequence_parallel
        self.pre_process, self.post_process = pre_process, post_process
        self.ops = select_ops(config.fused_kernels) if ops is None else ops
        vocab = config.padded_vocab_size(parallel_state.get_grid().size("tp"))
        if pre_process or (post_process and config.embedding_on_last_stage):
            self.word_embeddings = VocabParallelEmbedding(vocab, config.hidden_size, sequence_parallel)
            weight = self.word_embeddings.weight
            place(weight, replace(placement(weight), unpadded_rows=config.vocab_size))
            weight.is_embedding_or_output_parameter = True  # AdamW's under --optimizer muon (Megatron's name)
            if config.embedding_on_last_stage and parallel_state.get_grid().size("pp") > 1:
                # The first and the last stage each hold a copy of the table (input embedding,
                # and output layer or MTP embedding); the two copies' grads are summed every step.
                with_partial_grads(weight, "embedding")
                if parallel_state.get_grid().v_shape and not pre_process:  # both stages on this rank
                    place(weight, replace(placement(weight), second_copy=True))
        if pre_process and config.family == "gpt2":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
            self.position_embeddings.weight.is_embedding_or_output_parameter = True
            # Under SP each rank adds the rows of its own positions only: a partial grad.
            mark_sequence_parallel(self.position_embeddings, sequence_parallel)
        if config.family == "llama":
            cos, sin = rotary_tables(config)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        numbers = range(config.num_layers) if layer_numbers is None else layer_numbers
        self.layers = nn.ModuleDict({str(i): TransformerLayer(config, self.ops, sequence_parallel, i) for i in numbers})
        if post_process:
            self.final_layernorm = build_norm(config, self.ops, sequence_parallel)
            if not config.tie_embeddings:
                self.output_layer = ColumnParallelLinear(config.hidden_size, vocab, bias=False,
                                                         sequence_parallel=sequence_parallel)
                weight = self.output_layer.weight
                place(weight, replace(placement(weight), unpadded_rows=config.vocab_size))
                weight.is_embedding_or_output_parameter = True
            self.mtp = MultiTokenPrediction(config, self.ops, sequence_parallel) if config.mtp_depths else None

    def param_units(self) -> list[ParamUnit]:
        """The groups of parameters used together, in forward order (what ZeRO-3 gathers at once):
        the embeddings (whose backward reads only the token ids), each layer, and the output
        head (final norm and output layer, or the tied embedding), from the final norm's forward
        to the end of the model's."""
        units = []
        if self.pre_process:
            embeddings = [self.word_embeddings] + ([self.position_embeddings] if self.config.family == "gpt2" else [])
            units += [ParamUnit(f"embedding {i}", list(m.parameters()), m, m, backward_reads=False)
                      for i, m in enumerate(embeddings)]
        units += [ParamUnit(f"layer {number}", list(layer.parameters()), layer, layer)
                  for number, layer in self.layers.items()]
        if self.post_process:
            # The MTP modules run between the final norm and the end of the forward, with the embedding.
            mtp = [] if self.mtp is None else [*self.mtp.parameters(), self.word_embeddings.weight]
            params = list(dict.fromkeys([*self.final_layernorm.parameters(), self._output_weight(), *mtp]))
            units.append(ParamUnit("output", params, self.final_layernorm, self))
        return units

    def materialize(self, device: torch.device, dtype: torch.dtype | None = None, storage: bool = True) -> None:
        """Storage on `device` for a model built on the meta device (parallelize builds it so, then
        init_weights draws each rank's shard): every parameter uninitialised (the same attributes:
        its placement; `dtype`: the parameters'), the RoPE tables computed, the other buffers (MoE
        routers' statistics and expert bias) at zero, as they start. storage=False (ZeRO-3): the
        parameters get their device and shape but no storage, which the grad buffers give them,
        drawing only this rank's shard (distributed/data_parallel.py)."""
        for module in self.modules():
            for name, param in module.named_parameters(recurse=False):
                fresh = nn.Parameter(torch.empty_like(param, device=device, dtype=dtype), param.requires_grad)
                if not storage:
                    fresh.untyped_storage().resize_(0)
                fresh.__dict__.update(param.__dict__)
                setattr(module, name, fresh)
            for name, buffer in module.named_buffers(recurse=False):
                setattr(module, name, torch.zeros_like(buffer, device=device))
        if self.config.family == "llama":
            self.rotary_cos, self.rotary_sin = (t.to(device) for t in rotary_tables(self.config))

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(tokens)
        if self.config.family == "gpt2":
            if self.sequence_parallel:  # this rank's slice of the tokens
                grid = parallel_state.get_grid()
                positions = positions.chunk(grid.size("tp"), dim=-1)[grid.coord("tp")]
            x = x + self.position_embeddings(positions)
        with self._layers_rng():
            return self.embedding_dropout(x)

    def _layers_rng(self) -> contextlib.AbstractContextManager:
        """Under SP every dropout outside the tensor-parallel regions is on this rank's tokens: the
        tensor-parallel RNG."""
        return get_rng_tracker().fork() if self.sequence_parallel else contextlib.nullcontext()

    def _run_layers(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None,
                    inference_params: InferenceParams | None = None, doc_start: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """The layers in order; under full recomputation each group of layers keeps only its
        input and is replayed in backward (uniform: groups of recompute_num_layers; block: the
        first recompute_num_layers layers of this chunk, one by one, the rest kept)."""
        layers, cfg = list(self.layers.values()), self.config
        if cfg.recompute_granularity != "full" or not torch.is_grad_enabled():
            groups, replayed = [[layer] for layer in layers], 0
        elif cfg.recompute_method == "uniform":
            n = cfg.recompute_num_layers or 1
            groups = [layers[i:i + n] for i in range(0, len(layers), n)]
            replayed = len(groups)
        else:
            groups, replayed = [[layer] for layer in layers], cfg.recompute_num_layers

        def run(group: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
            for layer in group:
                x = layer(x, rotary, inference_params, doc_start)
            return x
        for i, group in enumerate(groups):
            x = checkpoint(functools.partial(run, group), x) if i < replayed else run(group, x)
        return x

    def forward(self, tokens: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                hidden: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                inference_params: InferenceParams | None = None, doc_start: torch.Tensor | None = None,
                mtp_tokens: torch.Tensor | None = None, mtp_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [b, s, vocab] without labels, per-token fp32 loss [b, s] with them; a stage that
        is not the last returns its hidden states. `hidden` is the input of a stage that is not the
        first. `positions` [s], or [b, s] when each sample has its own (--reset-position-ids):
        where in the sequence the tokens are (default 0..s-1; context parallelism gives each rank
        tokens from two places of the sequence; generation the positions after those in
        `inference_params`, its KV cache). `doc_start` [b, s] (--reset-attention-mask): where in the
        sequence each token's document starts; a token attends to none before it. With multi-token
        prediction modules, labels and `mtp_tokens`, `mtp_labels` ([b, s, N], model/mtp.py's
        add_mtp_targets): the per-token losses [b, s, 1 + N], the lm loss's then each module's."""
        if positions is None and inference_params is not None:
            offset = inference_params.sequence_len_offset
            positions = torch.arange(offset, offset + tokens.shape[1], device=tokens.device)
        if positions is None:
            seq = tokens.shape[1] if tokens is not None else hidden.shape[1] * (
                parallel_state.get_grid().size("tp") if self.sequence_parallel else 1)
            positions = torch.arange(seq, device=(tokens if tokens is not None else hidden).device)
        x = self.embed(tokens, positions) if self.pre_process else hidden
        rotary = None if self.config.family == "gpt2" else (self.rotary_cos[positions], self.rotary_sin[positions])
        with self._layers_rng():
            x = self._run_layers(x, rotary, inference_params, doc_start)
        if not self.post_process:
            return x
        x = self.final_layernorm(x)
        if labels is None:
            # Pad ids are not tokens: drop their logits.
            logits = F.linear(enter_tensor_parallel_region(x, self.sequence_parallel), self._output_weight())
            return gather_from_tensor_model_parallel_region(logits)[..., : self.config.vocab_size]
        loss = self._loss(x, labels)
        if self.mtp is None or mtp_tokens is None:
            return loss
        losses = [loss]
        for k, layer in enumerate(self.mtp.layers):
            embedded = self.embed(mtp_tokens[..., k], positions)
            with self._layers_rng():
                x = layer(x, embedded, rotary, doc_start)
            losses.append(self._loss(x, mtp_labels[..., k]))
        return torch.stack(losses, dim=-1)

    def _output_weight(self) -> torch.Tensor:
        """The output layer's weight, column-parallel over the vocabulary (tied: the embedding table)."""
        return self.word_embeddings.weight if self.config.tie_embeddings else self.output_layer.weight

    def _loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token loss of the final hidden states x against labels, through the output layer."""
        x = enter_tensor_parallel_region(x, self.sequence_parallel)
        return self.ops.lm_loss(x, self._output_weight(), labels, self.config.vocab_size)


def _is_output_projection(name: str) -> bool:
    return name.endswith(("linear_proj.weight", "linear_fc2.weight", "experts.linear_fc2"))


def init_weights(model: nn.Module, config: ModelConfig, seed: int) -> None:
    """Megatron-style init, each parameter drawn by a generator keyed by the seed and its name.

    Normal(0, std) for weights, std/sqrt(2*num_layers) for the projections that write into
    the residual stream (the GPT-2 paper's scaled init), zero biases, unit norm gammas.
    Each rank draws only its shard's values, each the full tensor's value at that position
    (model/initialization.py); with the key by name rather than by construction order, the
    values do not depend on which layers or shard a rank builds: every parallel layout starts
    from the single-device weights. Vocabulary pad rows start at zero; they are never looked up
    nor scored, so they stay zero.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            init_range_(param.view(-1), param, name, config, seed, 0, param.numel())


def init_range_(out: torch.Tensor, param: torch.Tensor, name: str, config: ModelConfig, seed: int, lo: int,
                hi: int) -> None:
    """Fill `out` with what init_weights gives the elements [lo, hi) of `param` (named `name`) flattened: ZeRO-3
    draws its slice of each bucket so (distributed/data_parallel.py), from a parameter still on the meta device."""
    if name.endswith("bias"):
        out.zero_()
    elif is_norm_weight(name):  # gamma 1, stored as 0 when zero-centred
        out.fill_(0.0 if config.apply_layernorm_1p else 1.0)
    else:
        std = config.init_method_std / math.sqrt(2.0 * config.num_layers) if _is_output_projection(name) \
            else config.init_method_std
        normal_range_(out, param, zlib.crc32(f"{seed}:{name}".encode()), std, lo, hi)
