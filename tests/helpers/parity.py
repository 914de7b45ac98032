"""Train a few steps under any layout and collect what parity tests compare with one device.

The same function runs in the test process (one device) and on every spawned rank; what it
returns is gathered to full tensors, so results compare name by name.

What is compared, and why each tolerance is what it is (fp32 on CPU; "measured" is the
largest difference over every layout the suite runs):

- Every layout computes the same sums as one device in another order (sharded matmuls,
  all-reduces, microbatch accumulation), so step 1 differs by rounding only: about 1e-7
  relative. Later steps start from weights that already differ by that rounding, which
  Adam amplifies (below), so their tolerances are looser.
- `grad`, step 1, before clipping, relative to each tensor's largest element: measured 8e-7,
  allowed 1e-5. Clipping rescales every grad by one factor, and Adam is almost invariant to
  the grads' scale, so after clipping neither grads nor weights would show a gradient that is
  uniformly off by a factor (summed instead of averaged over dp, say): grads are compared
  before clipping.
- `grad_norm_first`, the norm the layout reports at step 1 (squares summed over ranks, each
  element counted once), relative: measured 1.6e-7, allowed 1e-6. Counting tp-replicated
  norm weights tp times, or a dp sum for a mean, is off by percents.
- `grad_norm`, every step, relative: measured 2.2e-6 (tp 2 + SP with pp, step 4), allowed 2e-5.
- `loss`, every step (the lm loss and each multi-token prediction module's), relative: measured
  9e-8, allowed 1e-6. A real error (a missing reduction, a wrong shard, a wrong average) moves
  the loss by 1e-3 or more.
- `weight`, absolute, after the last step: measured 3.7e-5, allowed 1e-4 (10 % of one
  lr=1e-3 step). Adam divides by sqrt(v), so an entry whose gradient is near zero, where
  rounding differs in relative terms, moves by a visible fraction of lr; a real error moves
  weights by whole lr steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_lite import parallel_state
from megatron_lite.comm import all_gather_flat
from megatron_lite.config import Config
from megatron_lite.data.random_tokens import RandomTokens
from megatron_lite.distributed.data_parallel import materialized
from megatron_lite.distributed.distributed_optimizer import DistributedOptimizer
from megatron_lite.distributed.parameter_server import ParameterServerOptimizer
from megatron_lite.placement import gather_full
from megatron_lite.training.loop import rank_microbatches, set_seed, train_step
from megatron_lite.training.parallelize import TrainingModel, parallelize


@dataclass(frozen=True)
class Tolerance:
    """Largest allowed differences from one device (see the module docstring for why)."""
    grad: float = 1e-5  # step 1, before clipping, relative to each tensor's largest element
    grad_norm_first: float = 1e-6  # relative
    grad_norm: float = 2e-5  # relative, every step
    loss: float = 1e-6  # relative, every step
    weight: float = 1e-4  # absolute, after the last step


PARITY = Tolerance()
# The pipeline schedules against each other: the same float operations, only the order in
# which microbatches accumulate differs. Measured: grad 0, grad norm 1.1e-7, loss 2.2e-8, weight 2.5e-7.
SCHEDULES = Tolerance(grad=1e-6, grad_norm_first=1e-6, grad_norm=1e-6, loss=2e-7, weight=4e-6)


def setup_rank(config: Config) -> TrainingModel:
    """This rank's groups (for config's layout), seed, and model and optimizer on CPU."""
    par = config.parallel
    parallel_state.initialize_model_parallel(par)
    set_seed(config.train.seed)
    return parallelize(config, torch.device("cpu"))


def full_grads(model: TrainingModel) -> dict[str, torch.Tensor]:
    """Every parameter's current grad as a full tensor (gathered over tp and, for the distributed
    optimizer, over the dp shards), keyed by its global name. A parameter server's workers hold
    only their own replica's grads, not the mean: none from them."""
    if isinstance(model.optimizer, ParameterServerOptimizer) and not model.optimizer.server:
        return {}
    grads = {}
    for buf in model.grad_buffers:
        grads.update(_gathered_grads(buf) if isinstance(model.optimizer, DistributedOptimizer)
                     else {p: p.main_grad for p in buf.ranges})
    return {n: gather_full(p, grads[p]) for chunk in model.chunks for n, p in chunk.named_parameters()}


def run_steps(config: Config, steps: int) -> dict:
    """Per step: loss (and the MTP modules' losses, one after another) and grad norm; grads of step 1
    before clipping and weights after the last step, of the parameters this rank holds (full over tp,
    keyed by their global names)."""
    device = torch.device("cpu")
    model = setup_rank(config)
    dataset = RandomTokens(config.model.vocab_size, config.model.seq_length)
    losses, mtp_losses, norms, grads = [], [], [], {}
    for iteration in range(1, steps + 1):
        batches = rank_microbatches(dataset, (iteration - 1) * config.train.global_batch_size, config, device)
        inspect = (lambda m: grads.update(full_grads(m))) if iteration == 1 else None
        step = train_step(model, batches, iteration, config, device, inspect_grads=inspect)
        losses.append(step.loss)
        mtp_losses.extend(step.mtp or [])
        norms.append(step.grad_norm)
    return {"losses": losses, "mtp_losses": mtp_losses, "grad_norms": norms, "grads": grads,
            "weights": full_weights(model)}


def full_weights(model: TrainingModel) -> dict[str, torch.Tensor]:
    """Every parameter this rank holds, as a full tensor (gathered over tp, and under ZeRO-3 from
    the dp shards), keyed by its global name."""
    model.optimizer.finish_param_gather()  # --overlap-param-gather leaves the last gather in flight
    main = model.optimizer.main_weights()  # ZeRO-3 holds only shards: the full values come from here
    return {n: gather_full(p, p if materialized(p) else main[p].to(p.dtype))
            for chunk in model.chunks for n, p in chunk.named_parameters()}


def _gathered_grads(buf) -> dict:
    """The distributed optimizer leaves only this rank's shard of each grad bucket reduced (and
    under ZeRO-2/3 keeps only that shard); the full grads from every rank's shard, to compare them."""
    flat = torch.zeros(buf.size)
    for bucket in buf.buckets:
        lo, hi = bucket.shard(buf.dp_rank, buf.dp)
        flat[lo:hi] = buf.grad_view(bucket, lo, hi)
        all_gather_flat(flat[bucket.start:bucket.end], buf.group)
    return {p: flat[lo:hi].view_as(p) for p, (lo, hi) in buf.ranges.items()}


def merge_tensors(per_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The union of every rank's named tensors; a name held by several ranks (replicated over dp
    or tp, or the tied embedding on the first and last stage) must be identical on all of them."""
    merged = {}
    for tensors in per_rank:
        for name, tensor in tensors.items():
            if name in merged:
                torch.testing.assert_close(tensor, merged[name], rtol=0, atol=1e-6, msg=name)
            merged[name] = tensor
    return merged


def merge_ranks(results: list[dict]) -> dict:
    """One result from every rank's run_steps: rank 0's losses and norms (every rank must report
    the same ones) and the merged grads and weights."""
    first = results[0]
    for result in results:
        assert all(result[key] == first[key] for key in ("losses", "mtp_losses", "grad_norms"))
    return {"losses": first["losses"], "mtp_losses": first["mtp_losses"], "grad_norms": first["grad_norms"],
            "grads": merge_tensors([r["grads"] for r in results]),
            "weights": merge_tensors([r["weights"] for r in results])}


def max_differences(reference: dict, result: dict, vocab_size: int) -> dict[str, float]:
    """The largest difference of each kind that Tolerance bounds."""
    def relative(xs: list[float], ys: list[float]) -> float:
        assert len(xs) == len(ys)
        return max(abs(x - y) / abs(x) for x, y in zip(xs, ys))

    def worst(a: dict, b: dict, scaled: bool) -> float:
        assert a.keys() == b.keys(), set(a) ^ set(b)
        # Vocabulary tables are padded differently per tp size; pad rows are not compared.
        diffs = []
        for name in a:
            x, y = a[name][:vocab_size], b[name][:vocab_size]
            scale = x.abs().max().item() if scaled else 1.0
            diffs.append((x - y).abs().max().item() / (scale or 1.0))
        return max(diffs)
    return {"grad": worst(reference["grads"], result["grads"], scaled=True),
            "grad_norm_first": relative(reference["grad_norms"][:1], result["grad_norms"][:1]),
            "grad_norm": relative(reference["grad_norms"], result["grad_norms"]),
            "loss": relative(reference["losses"] + reference["mtp_losses"], result["losses"] + result["mtp_losses"]),
            "weight": worst(reference["weights"], result["weights"], scaled=False)}


def assert_parity(reference: dict, result: dict, vocab_size: int, tolerance: Tolerance = PARITY) -> None:
    """Fail with every difference if any exceeds its tolerance."""
    diff = max_differences(reference, result, vocab_size)
    too_large = {k: v for k, v in diff.items() if v > getattr(tolerance, k)}
    assert not too_large, f"differences over {tolerance}: {too_large} (all: {diff})"
