"""Train one model under DP, TP, PP, CP, ZeRO-1/2/3 and 3D on CPU ranks; print what each costs.

    python tools/compare_parallelism.py                           # the default layouts, 8 layers, hidden 64
    python tools/compare_parallelism.py --layouts dp2 tp2-pp2-sp  # any layout name (megatron_lite/config/layout.py)

For every layout the same global batch trains for a few steps (all layouts give the same
losses: that is what the parity tests prove) and the table shows, per rank (the largest
over ranks): the bytes of weights, fp32 grads and Adam state as allocated (sharded by ZeRO-1, 2
and 3: the distributed optimizer, zero2, zero3 in a layout name), the peak of activation bytes saved for
backward, bytes each rank sends per step by group (tp / cp / pp / dp; ring-algorithm wire bytes
from the communication meter, so an all-reduce and the reduce-scatter + all-gather that
replace it under SP or the distributed optimizer compare fairly), and the step time. Times are
CPU and gloo: they show the shape of the trade-offs, not GPU speed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lite import parallel_state  # noqa: E402
from megatron_lite.comm import METER  # noqa: E402
from megatron_lite.config import Config, ConfigError, ModelConfig, ParallelConfig, TrainConfig  # noqa: E402
from megatron_lite.config.layout import Layout  # noqa: E402
from megatron_lite.data.random_tokens import RandomTokens  # noqa: E402
from megatron_lite.distributed.spawn import run_on_ranks  # noqa: E402
from megatron_lite.optimizer.optimizer import state_bytes  # noqa: E402
from megatron_lite.planner.activation_memory import SavedTensorMeter  # noqa: E402
from megatron_lite.planner.memory import RankCoords, activation_memory, state_memory  # noqa: E402
from megatron_lite.planner.traffic import step_traffic  # noqa: E402
from megatron_lite.training.loop import rank_microbatches, set_seed, train_step  # noqa: E402
from megatron_lite.training.parallelize import parallelize  # noqa: E402
from megatron_lite.training.report import memory_parts  # noqa: E402

DEFAULT_LAYOUTS = ["single", "dp4", "dp4-ps", "dp4-distopt", "dp4-zero2", "dp4-zero3", "tp4", "tp4-sp", "pp4",
                   "pp4-zbh1", "pp2-dp2-vpp2-zbv", "cp4", "cp4-allgather", "cp4-a2a", "tp2-pp2-dp2-sp-distopt"]
GROUPS = {"tp": ("tp",), "cp": ("cp",), "pp": ("pp",), "dp": ("dp", "dp-cp")}  # columns: groups metered


def layout_worker(layout: Layout, layers: int, hidden: int, steps: int) -> dict:
    config = Config(
        model=ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=8, num_query_groups=4,
                          seq_length=64, vocab_size=258, make_vocab_size_divisible_by=32),
        parallel=layout.apply(ParallelConfig()),
        train=TrainConfig(micro_batch_size=2, global_batch_size=16, train_iters=steps, device="cpu"))
    parallel_state.initialize_model_parallel(config.parallel)
    set_seed(config.train.seed)
    device = torch.device("cpu")
    model = parallelize(config, device)
    data = RandomTokens(config.model.vocab_size, config.model.seq_length)
    meter, times = SavedTensorMeter([p for c in model.chunks for p in c.parameters()]), []
    for it in range(1, steps + 1):
        batches = rank_microbatches(data, (it - 1) * config.train.global_batch_size, config, device)
        METER.reset()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            loss = train_step(model, batches, it, config, device)[0]
        times.append(time.perf_counter() - start)
    allocated = memory_parts(model)
    grid = parallel_state.get_grid()
    coords = RankCoords(grid.coord("pp"), grid.index("dp-cp"))
    exact = (state_memory(config, coords) == allocated
             and step_traffic(config, coords) == {k: float(v) for k, v in METER.bytes.items()})
    return {"params": allocated["weights"], "grads": allocated["grads"], "planned": exact,
            "planned_activations": activation_memory(config, coords.pp),
            "optimizer": state_bytes(model.optimizer.optimizer), "activations": meter.peak,
            "comm": {column: sum(METER.total(group=g, wire=True) for g in groups) for column, groups in GROUPS.items()},
            "time": sum(times[1:]) / max(len(times) - 1, 1), "loss": loss}


def _planner_verdict(ranks: list[dict]) -> str:
    """Whether the planner's formulas (megatron_lite/planner/) predicted every rank's state bytes and
    traffic exactly, and how far its activation peak is from the measured one."""
    error = max(abs(r["planned_activations"] / r["activations"] - 1) for r in ranks)
    state = "state+traffic exact" if all(r["planned"] for r in ranks) else "state/traffic DIFFER"
    return f"{state}, activations {100 * error:.1f}%"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", nargs="+", default=DEFAULT_LAYOUTS, metavar="NAME",
                        help="layout names such as single, dp4, tp2-sp, pp2-vpp2, tp2-pp2-dp2-sp-distopt")
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    mb = 2**20
    print(f"{'layout':22s} {'ranks':>5s} {'weights MB':>10s} {'grads MB':>8s} {'Adam MB':>8s} {'activ. MB':>9s} "
          + " ".join(f"{c + ' MB/step':>10s}" for c in GROUPS) + f" {'step ms':>8s} {'last loss':>9s}  planner")
    try:
        layouts = [Layout.parse(name) for name in args.layouts]
    except ConfigError as exc:
        parser.error(str(exc))
    for layout in layouts:
        ranks = run_on_ranks(layout_worker, layout.world_size, layout, args.num_layers, args.hidden_size, args.steps)
        worst = {k: max(r[k] for r in ranks) for k in ("params", "grads", "optimizer", "activations", "time")}
        comm = {c: max(r["comm"][c] for r in ranks) for c in GROUPS}
        print(f"{layout.name:22s} {layout.world_size:5d} {worst['params'] / mb:10.3f} {worst['grads'] / mb:8.3f} "
              f"{worst['optimizer'] / mb:8.3f} "
              f"{worst['activations'] / mb:9.2f} " + " ".join(f"{comm[c] / mb:10.2f}" for c in GROUPS)
              + f" {1e3 * worst['time']:8.1f} {ranks[0]['loss']:9.5f}  "
              + _planner_verdict(ranks), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
