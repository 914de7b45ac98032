"""Mixture of experts: a router picks k of E expert MLPs per token; expert parallelism splits the
experts over the "ep" group and moves tokens to them by all-to-all (Megatron-Core's MoE layer
with the alltoall token dispatcher, expert-tp 1: ep may take tp ranks, which under sequence
parallelism hold different tokens).

Per layer and microbatch:
  1. route     logits = x W_r^T (fp32); scores softmax or sigmoid; the top k (chosen on scores
               plus the expert bias when aux-loss-free balancing is on); their weights the
               softmax over the k logits (or the pre-softmax scores, or sigmoid scores
               normalised over the k)
  2. balance   the load-balancing loss and z-loss, added to the objective's gradient without
               changing the reported lm loss (AuxLoss below)
  3. dispatch  every (token, expert) pair sorted by expert; with a capacity factor the pairs
               beyond an expert's capacity (lowest weight first) are dropped; under ep the rows
               go to the rank holding their expert (all_to_all_rows), which regroups what it
               received by its local experts; or, with the allgather dispatcher, every ep rank
               gathers all tokens and routing and its outputs are reduce-scattered back
  4. experts   one MLP per local expert on its rows, as grouped GEMMs (torch._grouped_mm)
  5. combine   the reverse exchange and permutation, each row times its weight, summed per token

The statistics of the balancing losses are those of the whole microbatch: under sequence
parallelism (tp) and context parallelism (cp) a rank holds part of each sequence, so the counts
are summed over those groups and each rank differentiates its own tokens' share, exactly as
for the lm loss.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_lite import parallel_state
from megatron_lite.comm import all_gather, all_reduce, all_to_all_rows, reduce_scatter
from megatron_lite.config import ModelConfig
from megatron_lite.model.ops import Ops
from megatron_lite.optimizer.muon import mark_row_blocks
from megatron_lite.placement import Placement, Shard, place
from megatron_lite.tensor_parallel.layers import mark_sequence_parallel
from megatron_lite.tensor_parallel.mappings import _Conjugate
from megatron_lite.tensor_parallel.random import replaying


class AuxLoss(torch.autograd.Function):
    """Identity on the layer's output whose backward also starts the balancing loss's backward,
    with the weight the lm loss has in the step's objective (set by the stage runner)."""

    scale = 1.0  # loss scale x cp / number of microbatches, see pipeline_parallel/model_runner.py

    @staticmethod
    def forward(ctx, output: Tensor, aux: Tensor) -> Tensor:
        ctx.save_for_backward(aux)
        return output

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, AuxLoss.scale)


def _split_tokens_group(sequence_parallel: bool) -> str:
    """The group whose ranks hold different tokens of the same sequences."""
    return "tp-cp" if sequence_parallel else "cp"


class Router(nn.Module):
    def __init__(self, config: ModelConfig, sequence_parallel: bool) -> None:
        super().__init__()
        self.config, self.sequence_parallel = config, sequence_parallel
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        mark_sequence_parallel(self, sequence_parallel)
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts))
        # This step's routed (token, expert) pairs per expert, over the microbatches and (after
        # finish_step) over the data-parallel replicas: the balancing statistics and the log's load.
        self.register_buffer("tokens_per_expert", torch.zeros(config.num_experts), persistent=False)
        self.register_buffer("aux_loss_sum", torch.zeros(()), persistent=False)
        self.microbatches = 0  # training forwards since the last finish_moe_step

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [b, s, h] -> (weights [b*s, k], experts [b*s, k], the balancing loss to differentiate)."""
        cfg = self.config
        logits = F.linear(x.float(), self.weight.float())  # [b, s, E]
        if cfg.moe_router_force_load_balancing:
            # Benchmarking only (Megatron's): standard normal logits route each token, so every expert gets an even
            # share on average; the gradient passes through to the real logits (straight-through).
            logits = logits + (torch.randn_like(logits) - logits).detach()
        scores = logits.softmax(-1) if cfg.moe_router_score_function == "softmax" else logits.sigmoid()
        # Groups are ranked by sums of the values the top k is taken on: Megatron takes it on the logits when the
        # weights are the softmax over the chosen k (the same experts without groups: softmax keeps the order).
        ranked = logits if cfg.moe_router_num_groups and cfg.moe_router_score_function == "softmax" and not \
            cfg.moe_router_pre_softmax else scores
        choice = ranked if not cfg.moe_router_enable_expert_bias else ranked + self.expert_bias
        experts = self._choose(choice)
        if cfg.moe_router_score_function == "sigmoid":
            weights = scores.gather(-1, experts)
            weights = weights / weights.sum(-1, keepdim=True) if cfg.moe_router_topk > 1 else weights
        elif cfg.moe_router_pre_softmax:
            weights = scores.gather(-1, experts)
        else:
            weights = logits.gather(-1, experts).softmax(-1)
        if cfg.moe_router_topk_scaling_factor is not None:
            weights = weights * cfg.moe_router_topk_scaling_factor
        counts = torch.zeros_like(scores).scatter_(-1, experts, 1.0)  # [b, s, E] 0/1
        aux = self._balancing_loss(logits, scores, counts)
        if self.training and not replaying():  # evaluation and recomputation do not count
            self.tokens_per_expert += counts.detach().sum((0, 1))
            self.microbatches += 1
        return weights.flatten(0, 1), experts.flatten(0, 1), aux

    def _choose(self, choice: Tensor) -> Tensor:
        """The top k experts of each token by `choice` [b, s, E]; with group-limited routing only within the
        group-topk groups whose best topk/group-topk choices sum highest (Megatron's and DeepSeek's rule)."""
        cfg = self.config
        if cfg.moe_router_num_groups is None:
            return choice.topk(cfg.moe_router_topk, dim=-1).indices
        by_group = choice.unflatten(-1, (cfg.moe_router_num_groups, -1))  # [b, s, groups, E/groups]
        group_scores = by_group.topk(cfg.moe_router_topk // cfg.moe_router_group_topk, dim=-1).values.sum(-1)
        groups = group_scores.topk(cfg.moe_router_group_topk, dim=-1).indices
        kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, groups, True)
        masked = by_group.masked_fill(~kept[..., None], float("-inf")).flatten(-2)
        return masked.topk(cfg.moe_router_topk, dim=-1).indices

    def _balancing_loss(self, logits: Tensor, scores: Tensor, counts: Tensor) -> Tensor:
        """This rank's share of coeff * E/(k T^2) sum_i c_i sum_t p_ti (per sequence for
        seq_aux_loss) plus the z-loss; the shares of the ranks holding a sequence sum to the loss."""
        cfg = self.config
        group = _split_tokens_group(self.sequence_parallel)
        split = parallel_state.get_grid().size(group)
        b, s_local, num_experts = scores.shape
        seq = s_local * split
        aux = logits.new_zeros(())
        if cfg.moe_router_load_balancing_type != "none" and cfg.moe_aux_loss_coeff > 0:
            probs = scores if cfg.moe_router_score_function == "softmax" else scores / scores.sum(-1, keepdim=True)
            if cfg.moe_router_load_balancing_type == "aux_loss":
                c, p, tokens, sequences = counts.sum((0, 1)), probs.sum((0, 1)), b * seq, 1
            else:  # per sequence, averaged over the microbatch's sequences
                c, p, tokens, sequences = counts.sum(1), probs.sum(1), seq, b
            c = all_reduce(c.detach().clone(), group=group)
            aux = aux + (cfg.moe_aux_loss_coeff * num_experts / (cfg.moe_router_topk * tokens**2 * sequences)
                         * (c * p).sum())
        if cfg.moe_z_loss_coeff:
            aux = aux + cfg.moe_z_loss_coeff * torch.logsumexp(logits, -1).square().sum() / (b * seq)
        if self.training and not replaying():  # this rank's share; finish_moe_step sums the shares once per step
            self.aux_loss_sum += aux.detach()
        return aux


class Experts(nn.Module):
    """This rank's E/ep expert MLPs, stacked: fc1 [E/ep, ffn (x2 gated), h], fc2 [E/ep, h, ffn]."""

    def __init__(self, config: ModelConfig, ops: Ops) -> None:
        super().__init__()
        local = config.num_experts // parallel_state.get_grid().size("ep")
        gated = config.family == "llama"
        ffn = config.expert_ffn_hidden_size
        self.linear_fc1 = nn.Parameter(torch.empty(local, ffn * (2 if gated else 1), config.hidden_size))
        self.linear_fc2 = nn.Parameter(torch.empty(local, config.hidden_size, ffn))
        for param in (self.linear_fc1, self.linear_fc2):
            # Split over ep on the expert dim; the ranks holding the same experts (edp, tp ranks
            # among them) sum their grads in the experts' own grad buffer.
            place(param, Placement(shards=(Shard("ep", 0),)))
        if gated:  # each expert's [gate; up]: two matrices to Muon
            mark_row_blocks(self.linear_fc1, 1, (ffn, ffn))
        self.activation = ops.swiglu if gated else ops.gelu

    def forward(self, rows: Tensor, rows_per_expert: list[int]) -> Tensor:
        """Each expert on its run of rows (rows sorted by expert): one grouped GEMM per matrix
        (torch._grouped_mm) where torch has it and the strides allow, else a loop over experts."""
        if rows.shape[0] == 0:
            return rows.new_zeros(0, self.linear_fc2.shape[1])
        if self._grouped_mm_fits(rows):
            ends = torch.tensor(rows_per_expert, device=rows.device).cumsum(0).to(torch.int32)
            dtype = torch.get_autocast_dtype(rows.device.type) if torch.is_autocast_enabled(rows.device.type) else None
            rows, fc1, fc2 = (t if dtype is None else t.to(dtype) for t in (rows, self.linear_fc1, self.linear_fc2))
            hidden = torch._grouped_mm(rows, fc1.transpose(1, 2), offs=ends)
            return torch._grouped_mm(self.activation(hidden), fc2.transpose(1, 2), offs=ends)
        outputs = [self.activation(chunk @ self.linear_fc1[e].t()) @ self.linear_fc2[e].t()
                   for e, chunk in enumerate(rows.split(rows_per_expert))]
        return torch.cat(outputs)

    def _grouped_mm_fits(self, rows: Tensor) -> bool:
        """torch._grouped_mm needs every row of its operands 16-byte aligned."""
        if not hasattr(torch, "_grouped_mm"):
            return False
        dims = (rows.shape[1], *self.linear_fc1.shape[1:], *self.linear_fc2.shape[1:])
        return all(d * rows.element_size() % 16 == 0 for d in dims)


class MoELayer(nn.Module):
    """Router, token dispatch, experts and (optionally) a shared expert; input and output [b, s, h]
    (s/tp tokens under sequence parallelism, as every residual branch)."""

    def __init__(self, config: ModelConfig, ops: Ops, sequence_parallel: bool, shared_expert: nn.Module | None) -> None:
        super().__init__()
        self.config = config
        self.router = Router(config, sequence_parallel)
        self.experts = Experts(config, ops)
        self.shared_expert = shared_expert
        self.shared_expert_gate = None
        if config.moe_shared_expert_gate:  # Qwen2-MoE: sigmoid(x w) scales the shared expert per token
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
            mark_sequence_parallel(self.shared_expert_gate, sequence_parallel)

    def forward(self, x: Tensor) -> Tensor:
        weights, experts, aux = self.router(x)
        tokens = x.flatten(0, 1)
        out = self._routed(tokens, weights, experts).view_as(x)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return AuxLoss.apply(out, aux) if aux.requires_grad else out

    def _routed(self, tokens: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        cfg = self.config
        flat_expert, flat_weight = experts.flatten(), weights.flatten()
        keep = self._within_capacity(flat_expert, flat_weight, tokens.shape[0])
        grid = parallel_state.get_grid()
        if cfg.moe_token_dispatcher_type == "alltoall" or grid.size("ep") == 1:
            return self._combine(tokens, flat_weight, flat_expert, keep, cfg.num_experts, self._exchange_and_compute)
        # allgather: every ep rank sees every rank's tokens and routing, computes its own experts'
        # share of each token's output, and the shares are summed back to the tokens' owners.
        local = cfg.num_experts // grid.size("ep")
        first = grid.index("ep") * local
        tokens, flat_weight = _gather_ep(tokens), _gather_ep(flat_weight)
        flat_expert = all_gather(flat_expert, 0, "ep") - first
        keep = all_gather(keep.to(torch.uint8), 0, "ep").bool()  # gloo gathers no bools
        keep = keep & (flat_expert >= 0) & (flat_expert < local)
        out = self._combine(tokens, flat_weight, flat_expert.clamp(0, local - 1), keep, local,
                            lambda rows, per_expert: self._compute(rows, per_expert.tolist()))
        return _scatter_ep(out)

    def _combine(self, tokens: Tensor, flat_weight: Tensor, flat_expert: Tensor, keep: Tensor, num_experts: int,
                 compute) -> Tensor:
        """The kept (token, expert) pairs sorted by expert, `compute`d (rows, rows per expert) ->
        output rows, each times its weight, summed per token."""
        k = self.config.moe_router_topk
        order = torch.argsort(torch.where(keep, flat_expert, num_experts), stable=True)[:int(keep.sum())]
        per_expert = torch.bincount(flat_expert[order], minlength=num_experts)
        out_rows = compute(tokens[order // k], per_expert)
        out_rows = out_rows * flat_weight[order].unsqueeze(-1).to(out_rows.dtype)
        return torch.zeros_like(tokens).index_add_(0, order // k, out_rows.to(tokens.dtype))

    def _within_capacity(self, flat_expert: Tensor, flat_weight: Tensor, num_tokens: int) -> Tensor:
        """Which (token, expert) pairs each expert takes: all of them (dropless), or its
        capacity = ceil(factor * tokens * k / E) highest-weighted ones."""
        cfg = self.config
        if cfg.moe_expert_capacity_factor is None:
            return torch.ones_like(flat_expert, dtype=torch.bool)
        capacity = math.ceil(cfg.moe_expert_capacity_factor * num_tokens * cfg.moe_router_topk / cfg.num_experts)
        by_weight = torch.argsort(flat_weight.detach(), descending=True, stable=True)
        onehot = F.one_hot(flat_expert[by_weight], cfg.num_experts)
        position = (onehot.cumsum(0) * onehot).sum(1) - 1  # among its expert's pairs, by descending weight
        keep = torch.empty_like(flat_expert, dtype=torch.bool)
        keep[by_weight] = position < capacity
        return keep

    def _exchange_and_compute(self, rows: Tensor, per_expert: Tensor) -> Tensor:
        """Rows sorted by expert -> the experts' outputs in the same order; under ep through the
        ranks holding the experts."""
        grid = parallel_state.get_grid()
        ep, local = grid.size("ep"), self.config.num_experts // grid.size("ep")
        if ep == 1:
            return self._compute(rows, per_expert.tolist())
        # counts[j, e]: rows this rank sends rank j for its local expert e; received[j, e]: from rank j.
        counts = per_expert.view(ep, local)
        received = _exchange_counts(counts)
        send_rows, recv_rows = counts.sum(1).tolist(), received.sum(1).tolist()
        got = _AllToAllRows.apply(rows, send_rows, recv_rows)
        # Received: by source rank, then by local expert. Regroup by local expert for the experts.
        by_source = received.flatten().tolist()
        pieces = got.split(by_source)
        regroup = [j * local + e for e in range(local) for j in range(ep)]
        computed = self._compute(torch.cat([pieces[i] for i in regroup]), received.sum(0).tolist())
        back = computed.split([by_source[i] for i in regroup])
        restored = [None] * len(regroup)
        for piece, i in zip(back, regroup):
            restored[i] = piece
        return _AllToAllRows.apply(torch.cat(restored), recv_rows, send_rows)

    def _compute(self, rows: Tensor, rows_per_expert: list[int]) -> Tensor:
        """The experts on their rows; with --moe-pad-expert-input-to-capacity each expert's rows
        padded with zeros to the largest count (fixed shapes) and the padding dropped again."""
        if not self.config.moe_pad_expert_input_to_capacity or not rows_per_expert:
            return self.experts(rows, rows_per_expert)
        width = max(rows_per_expert)
        padded = torch.cat([torch.cat([chunk, chunk.new_zeros(width - len(chunk), chunk.shape[1])])
                            for chunk in rows.split(rows_per_expert)])
        out = self.experts(padded, [width] * len(rows_per_expert))
        return torch.cat([chunk[:n] for chunk, n in zip(out.split(width), rows_per_expert)])


def _exchange_counts(counts: Tensor) -> Tensor:
    """counts[j, e] sent to rank j; returns what every rank j sends this one, [ep, local]."""
    ep = counts.shape[0]
    return all_to_all_rows(counts, [1] * ep, [1] * ep, "ep")


def _gather_ep(t: Tensor) -> Tensor:
    """Every ep rank's t, concatenated in rank order; the gradient reduce-scattered back."""
    return _Conjugate.apply(t, lambda x: all_gather(x, 0, "ep"), lambda g: reduce_scatter(g, 0, "ep"))


def _scatter_ep(t: Tensor) -> Tensor:
    """The sum over ep ranks of t, each rank keeping its slice; the gradient all-gathered."""
    return _Conjugate.apply(t, lambda x: reduce_scatter(x, 0, "ep"), lambda g: all_gather(g, 0, "ep"))


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: Tensor, send_rows: list[int], recv_rows: list[int]) -> Tensor:
        ctx.splits = send_rows, recv_rows
        return all_to_all_rows(rows, send_rows, recv_rows, "ep")

    @staticmethod
    def backward(ctx, grad: Tensor):
        send_rows, recv_rows = ctx.splits
        return all_to_all_rows(grad.contiguous(), recv_rows, send_rows, "ep"), None, None


def moe_routers(chunks: list[nn.Module]) -> list[Router]:
    return [m for c in chunks for m in c.modules() if isinstance(m, Router)]


@torch.no_grad()
def finish_moe_step(chunks: list[nn.Module]) -> dict[str, float] | None:
    """After a step's backward: the step's load-balancing loss (summed over MoE layers, averaged
    over microbatches and replicas) and expert load (max/mean over experts, averaged over layers),
    on every rank; the expert bias moved towards balance. None without MoE layers anywhere."""
    routers = moe_routers(chunks)
    grid = parallel_state.get_grid()
    dp = grid.size("dp")
    loads = torch.stack([r.tokens_per_expert for r in routers]) if routers else None
    aux_shares = torch.stack([r.aux_loss_sum / max(r.microbatches, 1) for r in routers]) if routers else None
    if loads is not None:
        # Counts were summed over the ranks splitting a sequence only when they enter a balancing
        # loss; sum them here over every rank that holds other tokens, once per token, and the
        # ranks' shares of each layer's balancing loss over the ranks splitting a sequence.
        split_group = _split_tokens_group(routers[0].sequence_parallel)
        loads = all_reduce(all_reduce(loads, group=split_group), group="dp")
        aux_shares = all_reduce(aux_shares, group=split_group)
        for router, load in zip(routers, loads):
            if router.config.moe_router_enable_expert_bias:
                router.expert_bias += router.config.moe_router_bias_update_rate * torch.sign(load.mean() - load)
    aux = aux_shares.sum().cpu() if aux_shares is not None else torch.zeros(())
    balance = ((loads.max(1).values / loads.mean(1).clamp(min=1e-9)).sum().cpu() if loads is not None
               else torch.zeros(()))
    stats = torch.stack([aux.float(), balance.float(), torch.tensor(float(len(routers)))])
    if grid.size("pp") > 1:
        stats = all_reduce(stats.to(_device(chunks)), group="pp").cpu()
    for router in routers:
        router.tokens_per_expert.zero_()
        router.aux_loss_sum.zero_()
        router.microbatches = 0
    if stats[2] == 0:
        return None
    return {"load_balancing_loss": stats[0].item() / dp, "expert_load_max_over_mean": stats[1].item() / stats[2].item(),
            "tokens_per_expert": loads.tolist() if loads is not None else []}


def _device(chunks: list[nn.Module]) -> torch.device:
    return next(p.device for c in chunks for p in c.parameters())
