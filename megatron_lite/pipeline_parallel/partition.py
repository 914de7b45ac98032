"""Which layers each pipeline rank builds, as one model chunk per virtual stage."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from megatron_lite import parallel_state

# builder(global layer numbers, pre_process, post_process) -> the chunk: pre_process adds the
# embedding (first virtual stage), post_process the final norm, output layer and loss (last).
ChunkBuilder = Callable[[range, bool, bool], nn.Module]


def virtual_stage(pp: int, pp_rank: int, chunk: int, v_shape: bool = False) -> int:
    """The virtual stage model chunk `chunk` of pipeline rank `pp_rank` holds.

    Interleaved (Megatron's), chunk c of rank r is stage c*pp + r: a microbatch visits ranks 0,
    1, ..., pp-1 and then rank 0 again for the next chunk. In ZB-V's V (two chunks), chunk 0 is
    stage r and chunk 1 stage 2pp-1-r: down the ranks and back up, turning on the last rank, so
    the first and the last stage are both on rank 0.
    """
    return 2 * pp - 1 - pp_rank if v_shape and chunk == 1 else chunk * pp + pp_rank


def chunk_layers(num_layers: int, pp: int, vpp: int, pp_rank: int, chunk: int, v_shape: bool = False) -> range:
    """Global layer numbers of model chunk `chunk` on pipeline rank `pp_rank`: the layers are cut
    into pp*vpp equal virtual stages, in order."""
    per_stage = num_layers // (pp * vpp)
    stage = virtual_stage(pp, pp_rank, chunk, v_shape)
    return range(stage * per_stage, (stage + 1) * per_stage)


def stage_ends(pp: int, vpp: int, pp_rank: int, chunk: int, v_shape: bool = False) -> tuple[bool, bool]:
    """Whether the chunk is the first virtual stage (it embeds) and whether it is the last (its loss)."""
    stage = virtual_stage(pp, pp_rank, chunk, v_shape)
    return stage == 0, stage == pp * vpp - 1


def last_stage_rank(pp: int, v_shape: bool = False) -> int:
    """The pipeline rank that holds the last virtual stage (the output layer and loss)."""
    return 0 if v_shape else pp - 1


def build_model_chunks(build: ChunkBuilder, num_layers: int, vpp: int = 1, v_shape: bool = False) -> list[nn.Module]:
    """This rank's model chunks (one without interleaving), first and last stage parts included."""
    grid = parallel_state.get_grid()
    pp, rank = grid.size("pp"), grid.coord("pp")
    return [build(chunk_layers(num_layers, pp, vpp, rank, c, v_shape), *stage_ends(pp, vpp, rank, c, v_shape))
            for c in range(vpp)]
