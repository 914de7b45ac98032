"""AdamW with Megatron's parameter groups, and the plain optimizer (the learning rate: lr_schedule.py).

Megatron's mixed precision: under --bf16/--fp16 the model's weights are half precision (what
the forward reads, no per-microbatch re-cast of fp32 weights), their gradients accumulate in
an fp32 buffer (`main_grad`, distributed/data_parallel.py), and the optimizer keeps an fp32
"main" copy of each weight: AdamW steps the main copy with the fp32 grad and writes the
rounded result back into the model's weight. In fp32 the main copy is the weight itself.
Bytes per parameter on a data-parallel rank: fp32 4 weight + 4 grad + 8 Adam moments = 16;
bf16 2 + 4 + 4 main + 8 = 18. The distributed optimizer shards main copies and moments over
dp: 8 + 8/dp in fp32, 6 + 12/dp in bf16 (ZeRO-1); ZeRO-2 shards the grads too, 4 + 12/dp and
2 + 16/dp; ZeRO-3 everything, 16/dp and 18/dp, plus the gathered layers (distributed/).
Under --optimizer muon a matrix's state is one fp32 momentum buffer, 4 bytes instead of Adam's 8
(muon.py). With --optimizer-cpu-offload the main copies (also in fp32, then a copy of the weights) and the
moments are host memory.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from megatron_lite.config import TrainConfig
from megatron_lite.optimizer.clip_grads import clip_grad_norm, layout_sum
from megatron_lite.optimizer.loss_scaler import build_loss_scaler
from megatron_lite.optimizer.muon import Muon, MuonSettings, orthogonalize, uses_muon
from megatron_lite.placement import gather_full, is_expert, is_vocabulary_table, local_shard


class MainParam(NamedTuple):
    """What AdamW updates for (part of) one parameter."""
    main: torch.Tensor  # fp32; its .grad is the fp32 main grad
    param: nn.Parameter
    offset: int  # the first element of the flattened parameter that `main` holds
    model: torch.Tensor  # where the model reads those elements (the same tensor as `main` in fp32)
    device_grad: torch.Tensor | None = None  # --optimizer-cpu-offload: the grad on the device (main.grad: on the host)

    @property
    def grad(self) -> torch.Tensor | None:
        """The reduced fp32 grad where the model is (what clipping measures and scales)."""
        return self.main.grad if self.device_grad is None else self.device_grad


def main_param(model: torch.Tensor, grad: torch.Tensor | None, param: nn.Parameter, offset: int = 0,
               offload: bool = False) -> MainParam:
    """The fp32 tensor AdamW updates for `model` (a parameter or a piece of one), holding `grad`
    (None: an fp32 parameter without a grad buffer keeps the .grad autograd gives it). With
    `offload` it is a copy in host memory, whose grad the step copies from `grad`."""
    if offload:
        # Pinned host memory, so the copies to and from the GPU run asynchronously.
        main = model.detach().to("cpu", torch.float32, copy=True)
        main = main.pin_memory() if torch.cuda.is_available() else main
        main.grad = torch.zeros_like(main).pin_memory() if torch.cuda.is_available() else torch.zeros_like(main)
        return MainParam(main, param, offset, model, grad)
    main = model if model.dtype == torch.float32 else model.detach().float()
    if grad is not None:
        main.grad = grad
    return MainParam(main, param, offset, model)


# The state tensors shaped like a parameter that an optimizer entry may hold beside its step:
# AdamW's two moments, Muon's momentum (which a checkpoint stores piece by piece).
STATE_TENSORS = ("exp_avg", "exp_avg_sq", "momentum_buffer")


def param_groups(tensors: list[MainParam], cfg: TrainConfig) -> list[dict]:
    """The optimizer's groups: under --optimizer muon first the matrices Muon updates
    (optimizer/muon.py's uses_muon); then AdamW's: weight decay for matrices, none for biases and
    norm weights; with --decoupled-lr the vocabulary tables last, with their own peak and floor
    (lr_schedule.set_learning_rate reads them)."""
    orthogonal = [t for t in tensors if cfg.optimizer == "muon" and uses_muon(t.param)]
    decoupled = [t for t in tensors if cfg.decoupled_lr is not None and is_vocabulary_table(t.param)]
    taken = {id(t) for t in orthogonal + decoupled}
    rest = [t for t in tensors if id(t) not in taken]
    groups = [{"params": [t.main for t in orthogonal], "weight_decay": cfg.weight_decay, "muon": True}
              ] if cfg.optimizer == "muon" else []
    groups += [{"params": [t.main for t in rest if t.param.ndim > 1], "weight_decay": cfg.weight_decay},
               {"params": [t.main for t in rest if t.param.ndim == 1], "weight_decay": 0.0}]
    if decoupled:
        groups.append({"params": [t.main for t in decoupled], "weight_decay": cfg.weight_decay,
                       "max_lr": cfg.decoupled_lr,
                       "min_lr": cfg.min_lr if cfg.decoupled_min_lr is None else cfg.decoupled_min_lr})
    return groups


def build_optimizer(tensors: list[MainParam], cfg: TrainConfig,
                    orthogonalized: Callable[[list[torch.Tensor], list[torch.Tensor]], list[torch.Tensor]]
                    ) -> torch.optim.Optimizer:
    """AdamW, or with --optimizer muon Muon (AdamW inside it for what is not a hidden matrix), over
    param_groups. foreach=False keeps AdamW's update a plain per-tensor loop: identical results
    whatever the grouping or sharding of tensors, which the parity tests rely on."""
    groups = param_groups(tensors, cfg)
    if cfg.optimizer == "muon":
        settings = MuonSettings(cfg.muon_momentum, cfg.muon_use_nesterov, cfg.muon_num_ns_steps,
                                cfg.muon_coefficient_type, cfg.muon_scale_mode, cfg.muon_extra_scale_factor,
                                cfg.muon_split_qkv)
        return Muon(groups, cfg.lr, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps, settings, orthogonalized)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             foreach=False)


def state_bytes_per_element(muon: bool) -> int:
    """Optimizer state per updated element: Muon's fp32 momentum buffer, or AdamW's two fp32 moments."""
    return 4 if muon else 8


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state (Adam moments, Muon's momentum buffers) held by this rank."""
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)


class LocalOptimizer:
    """AdamW over all of this rank's parameters; every data-parallel replica runs the same update.

    What the training loop needs of an optimizer: param_groups (for the lr), clip_grads() (over
    grads_for_norm() and norm_groups), loss_scaler (--fp16), step(), state_dict()/load_state_dict()
    for checkpoints, and the fp32 weights a checkpoint stores (main_weights, load_main_weights).
    """

    norm_groups = ("mp",)  # grads are replicated over dp after the all-reduce: sum norms over tp x pp only
    expert_groups = ("pp", "ep")  # experts differ over pp and ep; their other replicas hold the same grads

    def __init__(self, chunks: list[nn.Module], cfg: TrainConfig, experts: bool = False) -> None:
        self.tensors = [main_param(p, getattr(p, "main_grad", None), p, offload=cfg.optimizer_cpu_offload)
                        for c in chunks for p in c.parameters() if p.requires_grad]
        self._build(cfg, experts)

    def _build(self, cfg: TrainConfig, experts: bool) -> None:
        """AdamW (or --optimizer muon: Muon and AdamW) over the main tensors, grouped by their
        parameter's rank; the --fp16 loss scaler; the groups the experts' norm sums over (None: the
        model has no experts, on any rank)."""
        self.expert_norm_groups = self.expert_groups if experts else None
        self.optimizer = build_optimizer(self.tensors, cfg, self._orthogonalized)
        self.loss_scaler = build_loss_scaler(cfg)

    def full_local(self, pieces: list[tuple[MainParam, torch.Tensor]],
                   wanted: Callable[[nn.Parameter], bool] = lambda p: True) -> dict[nn.Parameter, torch.Tensor]:
        """Each `wanted` parameter's full local tensor (this rank's tp and ep shard) from values laid
        out as the main tensors (`pieces`: a main tensor and its value). Here every main tensor is a
        whole parameter; the distributed optimizer gathers its shards (collective over dp x cp)."""
        return {t.param: value.view_as(t.param) for t, value in pieces if wanted(t.param)}

    def _orthogonalized(self, mains: list[torch.Tensor], updates: list[torch.Tensor]) -> list[torch.Tensor]:
        """Muon's orthogonalised update of each main tensor from its momentum update: the update
        of the full matrix, not of this rank's piece. The pieces are gathered whole over the
        data-parallel shards (full_local) and over tp, every rank orthogonalises the full matrices
        it holds a piece of (the tp ranks of one matrix all compute it: Megatron's "duplicated"
        mode) and keeps its piece. Experts are whole on their ep rank: no gather."""
        by_main = {id(t.main): t for t in self.tensors}
        pieces = [(by_main[id(main)], update) for main, update in zip(mains, updates)]
        full = self.full_local(pieces, uses_muon)
        held = {t.param for t, _ in pieces}
        result = {}
        for param, local in full.items():  # the same parameters in the same order on every tp rank
            dense = not is_expert(param)
            whole = gather_full(param, local) if dense else local  # collective over tp
            if param in held:
                update = orthogonalize(param, whole, self.optimizer.settings)
                result[param] = local_shard(update, param) if dense else update
        return [result[t.param].flatten()[t.offset:t.offset + t.main.numel()].view_as(t.main) for t, _ in pieces]

    def grads_for_norm(self) -> list[tuple[torch.Tensor, nn.Parameter]]:
        return [(t.grad, t.param) for t in self.tensors if t.grad is not None]

    def params_norm(self) -> float:
        """L2 norm of all weights (their fp32 main copies), over the whole model (--log-params-norm)."""
        pairs = [(t.main, t.param) for t in self.tensors]
        return layout_sum(pairs, lambda main: torch.linalg.vector_norm(main.float()).square(), torch.float32,
                          self.norm_groups, self.expert_norm_groups).sqrt().item()

    def num_zeros_in_grad(self) -> int:
        """Gradient entries that are exactly zero, over the whole model (--log-num-zeros-in-grad)."""
        return int(layout_sum(self.grads_for_norm(), lambda grad: (grad == 0).sum().double(), torch.float64,
                              self.norm_groups, self.expert_norm_groups).item())

    def clip_grads(self, max_norm: float) -> float:
        """Clip the grads to a global norm of max_norm (0: measure only); returns the norm before."""
        return clip_grad_norm(self.grads_for_norm(), max_norm, self.norm_groups, self.expert_norm_groups)

    @property
    def param_groups(self) -> list[dict]:
        # A property, not an attribute: load_state_dict replaces the inner optimizer's group dicts.
        return self.optimizer.param_groups

    def step(self) -> None:
        # --optimizer-cpu-offload: the (clipped) grads to the host, each copy queued behind the
        # previous ones, one wait; the updated weights go back the same way.
        offloaded = [t for t in self.tensors if t.device_grad is not None]
        for t in offloaded:
            t.main.grad.copy_(t.device_grad, non_blocking=True)
        if offloaded and torch.cuda.is_available():
            torch.cuda.synchronize()
        self.optimizer.step()
        self._copy_main_to_model()

    @torch.no_grad()
    def _copy_main_to_model(self) -> None:
        for t in self.tensors:
            if t.main is not t.model:
                t.model.copy_(t.main, non_blocking=True)

    def finish_param_gather(self) -> None:
        """Nothing in flight: every replica updates its own full weights."""

    def main_weights(self) -> dict[nn.Parameter, torch.Tensor]:
        """Each parameter's fp32 value (the main copy) as this rank's full local tensor; collective
        for the distributed optimizer, whose main copies are sharded."""
        return {t.param: t.main for t in self.tensors}

    @torch.no_grad()
    def load_main_weights(self, weights: dict[nn.Parameter, torch.Tensor]) -> None:
        """Set the main copies (and through them the model's weights) from fp32 local tensors; a
        parameter `weights` lacks keeps its main copy (a ZeRO-3 checkpoint load fills it in place)."""
        for t in self.tensors:
            if t.param in weights:
                t.main.copy_(weights[t.param].flatten()[t.offset:t.offset + t.main.numel()].view_as(t.main))
        self._copy_main_to_model()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
