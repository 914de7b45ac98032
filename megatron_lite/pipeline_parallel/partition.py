"""Which layers each pipeline rank builds, as one model chunk per virtual stage."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from megatron_lite import parallel_state

# builder(global layer numbers, pre_process, post_process) -> the chunk: pre_process adds the
# embedding (first virtual stage), post_process the final norm, output layer and loss (last).
ChunkBuilder = Callable[[range, bool, bool], nn.Module]


def chunk_layers(num_layers: int, pp: int, vpp: int, pp_rank: int, chunk: int) -> range:
    """Global layer numbers of model chunk `chunk` on pipeline rank `pp_rank`.

    The layers are cut into pp*vpp equal virtual stages; chunk c of rank r is virtual stage
    c*pp + r (Megatron's interleaving), so a microbatch visits rank 0, 1, ..., pp-1 and then
    rank 0 again for the next chunk.
    """
    per_stage = num_layers // (pp * vpp)
    stage = chunk * pp + pp_rank
    return range(stage * per_stage, (stage + 1) * per_stage)


def build_model_chunks(build: ChunkBuilder, num_layers: int, vpp: int = 1) -> list[nn.Module]:
    """This rank's model chunks (one without interleaving), first and last stage parts included."""
    grid = parallel_state.get_grid()
    pp, rank = grid.size("pp"), grid.coord("pp")
    return [build(chunk_layers(num_layers, pp, vpp, rank, c), rank == 0 and c == 0, rank == pp - 1 and c == vpp - 1)
            for c in range(vpp)]
