"""Which layers each pipeline rank builds, as one model chunk per virtual stage."""
from __future__ import annotations

from megatron_lite import parallel_state
from megatron_lite.config import ModelConfig, ParallelConfig
from megatron_lite.model.gpt import GPTModel


def chunk_layers(num_layers: int, pp: int, vpp: int, pp_rank: int, chunk: int) -> range:
    """Global layer numbers of model chunk `chunk` on pipeline rank `pp_rank`.

    The layers are cut into pp*vpp equal virtual stages; chunk c of rank r is virtual stage
    c*pp + r (Megatron's interleaving), so a microbatch visits rank 0, 1, ..., pp-1 and then
    rank 0 again for the next chunk.
    """
    per_stage = num_layers // (pp * vpp)
    stage = chunk * pp + pp_rank
    return range(stage * per_stage, (stage + 1) * per_stage)


def build_model_chunks(model_config: ModelConfig, parallel: ParallelConfig) -> list[GPTModel]:
    """This rank's model chunks (one without interleaving), first and last stage parts included."""
    grid = parallel_state.get_grid()
    vpp = parallel.virtual_pipeline_model_parallel_size or 1
    return [GPTModel(model_config, parallel.sequence_parallel,
                     chunk_layers(model_config.num_layers, grid.pp, vpp, grid.pp_rank, c),
                     pre_process=grid.pp_rank == 0 and c == 0,
                     post_process=grid.pp_rank == grid.pp - 1 and c == vpp - 1)
            for c in range(vpp)]
