"""Train one model under DP, TP, PP, the distributed optimizer and 3D on CPU ranks; print what each costs.

    python tools/compare_parallelism.py                      # all layouts, 8 layers, hidden 64
    python tools/compare_parallelism.py --layouts dp2 tp2    # any of the names below

For every layout the same global batch trains for a few steps (all layouts give the same
losses: that is what the parity tests prove) and the table shows, per rank (the largest
over ranks): weight and optimizer-state bytes, the peak of activation bytes saved for
backward, bytes each rank sends per step by group (tp / pp / dp; ring-algorithm wire bytes
from the communication meter, so an all-reduce and the reduce-scatter + all-gather that
replace it under SP or the distributed optimizer compare fairly), and the step time. Times are CPU and gloo: they show the shape of the
trade-offs, not GPU speed.
"""
from __future__ import annotations

import argparse
import sys
import time
import weakref
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lite import parallel_state  # noqa: E402
from megatron_lite.config import Config, ModelConfig, ParallelConfig, TrainConfig  # noqa: E402
from megatron_lite.data.loader import global_batch  # noqa: E402
from megatron_lite.distributed.spawn import run_on_ranks  # noqa: E402
from megatron_lite.optimizer import state_bytes  # noqa: E402
from megatron_lite.tensor_parallel import METER  # noqa: E402
from megatron_lite.training import set_seed, setup_model_and_optimizer, train_step  # noqa: E402

# name: (tp, pp, dp, sequence parallel, distributed optimizer)
LAYOUTS = {
    "single": (1, 1, 1, False, False),
    "dp4": (1, 1, 4, False, False),
    "dp4-distopt": (1, 1, 4, False, True),
    "tp4": (4, 1, 1, False, False),
    "tp4-sp": (4, 1, 1, True, False),
    "pp4": (1, 4, 1, False, False),
    "tp2-pp2-dp2": (2, 2, 2, True, True),
}


class RandomTokens:
    def __init__(self, vocab: int, seq: int) -> None:
        self.vocab, self.seq = vocab, seq

    def __getitem__(self, index: int):
        gen = torch.Generator().manual_seed(index)
        return torch.randint(0, self.vocab, (self.seq + 1,), generator=gen).numpy()


class ActivationMeter:
    """Live bytes of tensors saved for backward, and their peak, via saved-tensor hooks."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor) -> object:
        holder = type("Saved", (), {})()
        holder.tensor, nbytes = t, t.numel() * t.element_size()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(holder, self._release, nbytes)  # runs when autograd drops the saved tensor
        return holder

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    @staticmethod
    def unpack(holder: object) -> torch.Tensor:
        return holder.tensor


def layout_worker(name: str, layers: int, hidden: int, steps: int) -> dict:
    tp, pp, dp, sp, distopt = LAYOUTS[name]
    config = Config(
        model=ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=8, num_query_groups=4,
                          seq_length=64, vocab_size=258, make_vocab_size_divisible_by=32),
        parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, data_parallel_size=dp,
                                sequence_parallel=sp, use_distributed_optimizer=distopt),
        train=TrainConfig(micro_batch_size=2, global_batch_size=16, train_iters=steps, device="cpu"))
    parallel_state.initialize_model_parallel(tp, pp)
    set_seed(config.train.seed)
    device = torch.device("cpu")
    model = setup_model_and_optimizer(config, device)
    data = RandomTokens(config.model.vocab_size, config.model.seq_length)
    meter, times = ActivationMeter(), []
    for it in range(1, steps + 1):
        batches = global_batch(data, (it - 1) * 16, 2, 16, device, parallel_state.get_data_parallel_rank(), dp)
        METER.reset()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            loss = train_step(model, batches, it, config, device)[0]
        times.append(time.perf_counter() - start)
    return {"params": 4 * sum(p.numel() for c in model.chunks for p in c.parameters()),
            "optimizer": state_bytes(model.optimizer.optimizer), "activations": meter.peak,
            "comm": {g: METER.total(group=g, wire=True) for g in ("tp", "pp", "dp")},
            "time": sum(times[1:]) / max(len(times) - 1, 1), "loss": loss}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    mb = 2**20
    print(f"{'layout':14s} {'ranks':>5s} {'weights MB':>10s} {'Adam MB':>8s} {'activ. MB':>9s} "
          f"{'tp MB/step':>10s} {'pp MB/step':>10s} {'dp MB/step':>10s} {'step ms':>8s} {'last loss':>9s}")
    for name in args.layouts:
        tp, pp, dp, _, _ = LAYOUTS[name]
        ranks = run_on_ranks(layout_worker, tp * pp * dp, name, args.num_layers, args.hidden_size, args.steps)
        worst = {k: max(r[k] for r in ranks) for k in ("params", "optimizer", "activations", "time")}
        comm = {g: max(r["comm"][g] for r in ranks) for g in ("tp", "pp", "dp")}
        print(f"{name:14s} {tp * pp * dp:5d} {worst['params'] / mb:10.3f} {worst['optimizer'] / mb:8.3f} "
              f"{worst['activations'] / mb:9.2f} {comm['tp'] / mb:10.2f} {comm['pp'] / mb:10.2f} "
              f"{comm['dp'] / mb:10.2f} {1e3 * worst['time']:8.1f} {ranks[0]['loss']:9.5f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
