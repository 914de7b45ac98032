"""How long a pipeline stage computes one microbatch, forward and backward, and the optimizer
step: each GEMM at the efficiency its shape reaches, attention at a flash kernel's measured
efficiency, the memory-bound ops at the HBM bandwidth a streaming kernel reaches, and a fixed
cost per kernel a layer runs (the numbers: planner/calibration.py; what differs between training
codes: planner/software.py).

Per layer and token (h hidden, a/g query/kv heads of width d, f the MLP width, t = tp, t_s = tp
under sequence parallelism else 1), forward:
- GEMMs: QKV (h x (a + 2g)d/t), the output projection (ad/t x h), the MLP (h x gate·f/t and
  f/t x h; a mixture-of-experts layer's k routed experts, each seeing its share of the tokens,
  and its shared expert); the last stage's output layer (h x V/t). Backward computes the input
  and the weight gradients: two GEMMs of the same shape, twice the forward's time.
- attention: a causal flash kernel computes 4·s/2·a·d/t FLOPs per token (each query sees s/2
  keys on average; a layer with a window of w, at most w + 1; under document masking, documents
  of L tokens, L/2: the kernel skips other documents' key blocks), its backward 2.5 times that (it recomputes
  the scores); Megatron-LM 2021's unfused attention computes the whole s x s (the mask is
  applied after) as batched GEMMs.
- memory-bound ops, bytes per token at 2 bytes an element: two norms (read h, write h) and two
  residual adds (read 2h, write h) on this rank's tokens (/t_s); the activation (SwiGLU reads 2f,
  writes f; GeLU f and f), RoPE (q and k, in and out), flash attention's q, k, v in and output
  out, or the unfused scores (written and read for the softmax, again for its dropout) (/t).
  Backward moves about twice the forward's bytes. Eager elementwise ops move eager_traffic
  times this fused minimum; the loss, when the logits are materialised (no fused linear +
  cross-entropy), writes and reads them forward and backward.
Multi-latent attention (model/mla.py) has its own GEMMs (planner/parameters.py: mla_linears; the
duplicated down-projections on this rank's tokens under SP), its attention kernel runs at the padded
width (the wider of the query/key and value heads, zero channels included: what runs, where MFU
counts the model's math, planner/flops.py), RoPE turns the rotated channels only, the latent norms
add their bytes, and q, k and v are assembled at the padded width (copies; mla_up_proj
recomputation replays the up-projections, RoPE and that assembly).
Kernels per layer, forward (each costs the calibration's kernel_overhead besides its work): the
GEMMs (4: fused QKV, output projection, fc1, fc2; 7 where q, k, v, gate and up are linears of
their own; a mixture of experts: the router, each local expert's and the shared expert's), the
attention kernel and the copy of its output into the projection's layout (Megatron-LM 2021's
unfused attention: two batched GEMMs, the masked softmax, the dropout), and the elementwise ops,
one kernel each when fused (two norms, the activation, RoPE of q and k, two residual adds), or as eager
PyTorch runs them: an RMSNorm 8 (upcast, square, mean, add eps, rsqrt, scale, downcast, weight),
a LayerNorm 1 (one native kernel), SwiGLU 2 (silu, multiply), GeLU 1, RoPE 5 per tensor of q and
k (negate, concatenate, two multiplies, add), the adds 1 each. Backward runs two kernels per
forward kernel (a GEMM's input and weight gradients; an elementwise op's gradient and its
reduction or cast).
Recomputation replays the forward (time and kernels) of what it recomputes: full, whole layers; selective, its
modules (core_attn: the attention kernel; mlp: the MLP's GEMMs and activation; layernorm: the
norms), or under torchtitan's op policy every second matmul and every memory-bound op but
attention's (software.py). The optimizer reads each parameter it updates (fp32 main weight, grad, two moments,
and the grad again for the norm) and writes three fp32 tensors and the bf16 weight; under --optimizer muon a matrix
has one momentum buffer instead of two moments, and its Newton-Schulz steps are GEMMs on the stage's full
matrices (planner/flops.py), timed as the model's are.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from megatron_lite.config import Config
from megatron_lite.pipeline_parallel.partition import chunk_layers, last_stage_rank
from megatron_lite.planner.calibration import Calibration
from megatron_lite.planner.flops import muon_matrices, newton_schulz_gemms
from megatron_lite.planner.hardware import GPU
from megatron_lite.planner.memory import RankCoords, logits_kept, optimizer_elements
from megatron_lite.planner.parameters import mla_linears
from megatron_lite.planner.software import Software

FLASH_BACKWARD = 2.5  # a flash backward's matmul work over its forward's (it recomputes the scores)
BACKWARD_KERNELS = 2  # kernels a backward runs per forward kernel (module docstring)
# Elementwise kernels per forward (module docstring): fused, one per op; eager, as PyTorch runs them.
FUSED_KERNELS = {"rmsnorm": 1, "layernorm": 1, "swiglu": 1, "gelu": 1, "rope": 1, "add": 1}
EAGER_KERNELS = {"rmsnorm": 8, "layernorm": 1, "swiglu": 2, "gelu": 1, "rope": 10, "add": 1}
# Multi-latent attention's copies that assemble q, k and v (model/mla.py: _up_project): the rotated parts made
# contiguous (2), the concatenations (2), the query scale, the padding of q, k and v (3).
MLA_ASSEMBLY_KERNELS = 8


@dataclass(frozen=True)
class StageCompute:
    """One microbatch on the busiest stage (the last: it also computes the logits), and the step's optimizer."""
    forward_s: float
    backward_s: float  # recomputation's replayed forward included
    optimizer_s: float
    layers: int  # transformer layers the stage runs per microbatch (ZeRO-3 gathers them one by one)
    parts: dict[str, float]  # forward_s + backward_s by kind: gemm, attention, memory, recompute, kernels
    kernels: float  # kernels the stage's layers run per microbatch, forward and backward


@dataclass
class _Parts:
    """One layer's forward by part: GEMMs, attention kernel, memory-bound ops; in seconds, or in
    kernels (_Cost.kernels), so that recomputation replays both alike."""
    gemm: dict[str, float]
    attention: float
    memory: dict[str, float]

    @property
    def forward(self) -> float:
        return self.gemm["attention"] + self.gemm["mlp"] + self.attention + sum(self.memory.values())


class _Cost:
    """The seconds of a GEMM, of memory-bound bytes and of a layer's parts, for one microbatch on one rank."""

    def __init__(self, config: Config, gpu: GPU, calibration: Calibration, software: Software,
                 document_length: float | None = None) -> None:
        self.config, self.gpu, self.cal, self.software = config, gpu, calibration, software
        # The keys a query's context spans: the sequence, or its document under document masking.
        self.context = config.model.seq_length if document_length is None else min(config.model.seq_length,
                                                                                   document_length)
        self.peak = gpu.peak_tflops * 1e12
        par = config.parallel
        self.tp = par.tensor_model_parallel_size
        self.tp_s = self.tp if par.sequence_parallel else 1
        self.tokens = config.train.micro_batch_size * config.model.seq_length // par.context_parallel_size
        self.nbytes = config.train.params_dtype.itemsize
        ours = config.model.fused_kernels or config.train.compile
        self.fused = ours if software.fused_elementwise is None else software.fused_elementwise
        self.fused_loss = not logits_kept(config) if software.fused_loss is None else software.fused_loss

    def gemm(self, m: float, k: float, n: float) -> float:
        """Forward seconds of an m x k x n GEMM."""
        intensity = m * k * n / (m * k + k * n + m * n)
        return 2 * m * k * n / (self.peak * self.cal.gemm_efficiency(self.gpu, intensity))

    def memory(self, elements_per_token: float, eager: bool = True) -> float:
        """Forward seconds of memory-bound ops moving `elements_per_token` elements per token."""
        factor = self.cal.eager_traffic if eager and not self.fused else 1.0
        return factor * self.tokens * elements_per_token * self.nbytes / self.cal.hbm_bandwidth(self.gpu)

    def mlp(self, ffn: float, tokens: float, gate: int) -> float:
        h = self.config.model.hidden_size
        return self.gemm(tokens, h, gate * ffn) + self.gemm(tokens, ffn, h)

    def layer(self, moe: bool, window: int | None) -> _Parts:
        """A layer's parts: a mixture of experts or dense, attending within `window` (None: the causal context)."""
        model, t = self.config.model, self.tp
        h, a, g, d, f, s = (model.hidden_size, model.num_attention_heads, model.num_query_groups, model.head_dim,
                            model.ffn_hidden_size, model.seq_length)
        llama = model.family == "llama"
        gate = 2 if llama else 1
        m = self.tokens
        if model.multi_latent_attention:
            gemm = self._mla_gemms(moe)
            d = model.attention_padded_head_dim  # the kernel's width, zero channels included
        else:
            gemm = {"attention": self.gemm(m, h, (a + 2 * g) * d / t) + self.gemm(m, a * d / t, h)}
            # The second, fourth and sixth matmul of a llama layer's forward (separate q, k, v, out,
            # gate, up, down projections): k, out and up, which torchtitan's op policy replays.
            gemm["every_other"] = (self.gemm(m, h, g * d / t) + self.gemm(m, a * d / t, h)
                                   + self.gemm(m, h, f / t)) if llama and not moe else 0.0
        if moe:
            experts, k, ep = model.num_experts, model.moe_router_topk, self.config.parallel.expert_model_parallel_size
            # Balanced routing: each of the E/ep local experts computes m·k·ep/E tokens.
            gemm["mlp"] = experts / ep * self.mlp(model.expert_ffn_hidden_size, m * k * ep / experts, gate)
            width = k * model.expert_ffn_hidden_size
            if model.moe_shared_expert_intermediate_size:
                gemm["mlp"] += self.mlp(model.moe_shared_expert_intermediate_size / t, m, gate)
                width += model.moe_shared_expert_intermediate_size / t
        else:
            gemm["mlp"] = self.mlp(f / t, m, gate)
            width = f / t
        if self.software.attention == "flash":
            keys = self.context / 2 if window is None else min(self.context / 2, window + 1)
            attention = 4 * m * keys * a * d / t / (self.peak * self.cal.attention_efficiency)
            attention_io = self.memory((2 * a + 2 * g) * d / t, eager=False)
        else:  # the s x s scores as batched GEMMs, at the efficiency of large ones
            attention = 4 * m * s * a * d / t / (self.peak * self.cal.gemm_ceiling)
            attention_io = self.memory(5 * a * s / t, eager=False)
        memory = {"layernorm": self.memory(2 * 2 * h / self.tp_s),
                  "mlp": self.memory((3 if llama else 2) * width),
                  "other": self.memory(2 * 3 * h / self.tp_s + (2 * (a + g) * d / t if llama else 0)),
                  "attention": attention_io}
        if model.multi_latent_attention:
            # RoPE turns only the rotated channels (each query head's and the one shared key's), in and out; the
            # latent norms read and write their latents on this rank's tokens; q, k and v are then assembled at
            # the padded width (concatenated, scaled, padded: written and read once more).
            pos, latents = model.qk_pos_emb_head_dim, sum(w.norm for w in mla_linears(model))
            memory["other"] = self.memory(2 * 3 * h / self.tp_s + 2 * latents / self.tp_s)
            memory["mla_up_proj"] = self.memory(2 * (a / t + 1) * pos + 2 * 3 * a * d / t)
        return _Parts(gemm, attention, memory)

    def _mla_gemms(self, moe: bool) -> dict[str, float]:
        """Multi-latent attention's GEMMs by part: all of them (the down-projections on this rank's tokens under
        SP, duplicated on every tp rank), the up-projections (what mla_up_proj recomputation replays), and every
        second matmul of the layer's forward, the MLP's separate gate, up and down after them (torchtitan's op
        policy; dense layers)."""
        model, t, m = self.config.model, self.tp, self.tokens
        h, f = model.hidden_size, model.ffn_hidden_size
        shapes = []
        for w in mla_linears(model):
            rows, cols = w.local_shape(t)
            shapes.append((m / self.tp_s if w.duplicated else m, cols, rows))
        times = [self.gemm(*shape) for shape in shapes]
        up = [time for time, w in zip(times, mla_linears(model)) if w.split == "column"]
        layer = times + [self.gemm(m, h, f / t), self.gemm(m, h, f / t), self.gemm(m, f / t, h)]
        return {"attention": sum(times), "mla_up_proj": sum(up), "every_other": 0.0 if moe else sum(layer[1::2])}

    def kernels(self, moe: bool) -> _Parts:
        """A layer's kernels per forward, by part (module docstring)."""
        model, par = self.config.model, self.config.parallel
        llama = model.family == "llama"
        separate = self.software.separate_projections and llama
        attention_gemms, mlp_gemms = (4, 3) if separate else (2, 2)
        gemm = {"attention": attention_gemms}
        if model.multi_latent_attention:  # its projections are linears of their own, the up-projections two
            gemm = {"attention": len(mla_linears(model)), "mla_up_proj": 2}
        if moe:
            local = model.num_experts / par.expert_model_parallel_size
            gemm["mlp"] = 1 + (local + bool(model.moe_shared_expert_intermediate_size)) * mlp_gemms
        else:
            gemm["mlp"] = mlp_gemms
        gemm["every_other"] = (gemm["attention"] + mlp_gemms) // 2 if llama and not moe else 0
        each = FUSED_KERNELS if self.fused else EAGER_KERNELS
        flash = self.software.attention == "flash"
        memory = {"layernorm": 2 * each["rmsnorm" if llama else "layernorm"],
                  "mlp": each["swiglu" if llama else "gelu"],
                  "other": 2 * each["add"] + (each["rope"] if llama else 0),
                  "attention": 1 if flash else 0}
        if model.multi_latent_attention:  # the latent norms; RoPE and the assembly of q, k and v in the up-projection
            memory["other"] = 2 * each["add"] + sum(bool(w.norm) for w in mla_linears(model)) * each["rmsnorm"]
            memory["mla_up_proj"] = each["rope"] + MLA_ASSEMBLY_KERNELS
        return _Parts(gemm, 1 if flash else 4, memory)


def _backward_factor(software: Software) -> float:
    return FLASH_BACKWARD if software.attention == "flash" else 2.0


def _replayed(config: Config, software: Software, parts: _Parts, layers: int) -> float:
    """What recomputation replays on `layers` layers of one kind: forward seconds, or kernels."""
    model = config.model
    if model.recompute_granularity == "full":
        replayed = layers if model.recompute_method == "uniform" else min(model.recompute_num_layers, layers)
        return parts.forward * replayed
    if model.recompute_granularity == "selective" and software.selective == "every_other_matmul":
        return layers * (parts.gemm["every_other"] + sum(parts.memory.values()) - parts.memory["attention"])
    modules = model.selective_recompute
    one = (parts.attention + parts.memory["attention"] if "core_attn" in modules else 0.0)
    one += parts.gemm["mlp"] + parts.memory["mlp"] if "mlp" in modules else 0.0
    one += parts.memory["layernorm"] if "layernorm" in modules else 0.0
    if "mla_up_proj" in modules:  # only with multi-latent attention, whose parts have these keys
        one += parts.gemm["mla_up_proj"] + parts.memory["mla_up_proj"]
    return layers * one


def _optimizer_bytes(config: Config, pp_rank: int) -> float:
    """Bytes the optimizer step moves on a rank of pipeline stage `pp_rank` (module docstring)."""
    adam, muon = optimizer_elements(config, RankCoords(pp=pp_rank))
    weight = 2 if config.train.params_dtype.itemsize != 4 else 0
    return adam * (4 + 16 + 12 + weight) + muon * (4 + 12 + 8 + weight)


def _newton_schulz_seconds(cost: _Cost, config: Config, layers: list[int]) -> float:
    """Muon's Newton-Schulz on the stage's matrices, each whole (duplicated over tp), as GEMMs."""
    train = config.train
    if train.optimizer != "muon":
        return 0.0
    return train.muon_num_ns_steps * sum(cost.gemm(*shape) for rows, cols in muon_matrices(config.model,
                                                                                              train.muon_split_qkv,
                                                                                              layers)
                                         for shape in newton_schulz_gemms(rows, cols))


def stage_compute(config: Config, gpu: GPU, calibration: Calibration, software: Software,
                  document_length: float | None = None) -> StageCompute:
    """The last pipeline stage's compute per microbatch, and the optimizer step; `document_length`:
    the documents' mean length under document masking (None: no documents)."""
    model, par = config.model, config.parallel
    cost = _Cost(config, gpu, calibration, software, document_length)
    pp_rank = last_stage_rank(par.pipeline_model_parallel_size, par.v_shape)
    numbers = [n for c in range(par.vpp) for n in chunk_layers(model.num_layers, par.pipeline_model_parallel_size,
                                                                par.vpp, pp_rank, c, par.v_shape)]
    # The multi-token prediction modules run on the last stage after the model: a layer each
    # (numbered after the model's), their 2h -> h projection and the output layer once more.
    depths = model.mtp_depths
    mtp_numbers = list(range(model.num_layers, model.num_layers + depths))
    # The stage's layers by kind, mixtures of experts first: how many of each (MoE or not, its window).
    counts = Counter(sorted(((model.is_moe_layer(n), model.layer_window(n)) for n in numbers + mtp_numbers),
                            key=lambda kind: not kind[0]))
    kinds = [(cost.layer(moe, window), cost.kernels(moe), count) for (moe, window), count in counts.items()]
    gemm = sum(n * (p.gemm["attention"] + p.gemm["mlp"]) for p, _, n in kinds)
    attention = sum(n * p.attention for p, _, n in kinds)
    memory = sum(n * sum(p.memory.values()) for p, _, n in kinds)
    replay = sum(_replayed(config, software, p, n) for p, _, n in kinds)
    forward_kernels = sum(n * k.forward for _, k, n in kinds)
    kernels = (1 + BACKWARD_KERNELS) * forward_kernels + sum(_replayed(config, software, k, n) for _, k, n in kinds)
    head = (1 + depths) * cost.gemm(cost.tokens, model.hidden_size, model.padded_vocab_size(cost.tp) / cost.tp)
    head += depths * cost.gemm(cost.tokens, 2 * model.hidden_size, model.hidden_size / cost.tp)
    # Materialised logits are written and read forward and again backward (whole step: not x 3).
    loss = 0.0 if cost.fused_loss else (1 + depths) * cost.memory(4 * model.padded_vocab_size(cost.tp) / cost.tp)
    parts = {"gemm": 3 * (gemm + head), "attention": (1 + _backward_factor(software)) * attention,
             "memory": 3 * memory + loss, "recompute": replay, "kernels": kernels * calibration.kernel_overhead}
    forward = gemm + attention + memory + head + forward_kernels * calibration.kernel_overhead
    return StageCompute(forward_s=forward, backward_s=sum(parts.values()) - forward,
                        optimizer_s=_optimizer_bytes(config, pp_rank) / calibration.hbm_bandwidth(gpu)
                        + _newton_schulz_seconds(cost, config, numbers + mtp_numbers), layers=len(numbers),
                        parts=parts, kernels=kernels)
