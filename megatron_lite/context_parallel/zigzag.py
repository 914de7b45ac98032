"""Which tokens of a sequence each context-parallel rank holds: the zigzag split.

The sequence is cut into 2*cp equal chunks and rank r holds chunks r and 2*cp-1-r. Under a
causal mask a query in chunk i attends to chunks 0..i, so a contiguous split (rank r holding
chunk r of cp) would give the last rank cp times the attention work of the first; pairing an
early chunk with a late one gives every rank the same work (2*cp-1 full chunk pairs and 2
diagonal ones).
"""
from __future__ import annotations

import torch

from megatron_lite import parallel_state


def chunk_ids(rank: int, cp: int) -> tuple[int, int]:
    """The two chunks (of 2*cp) that rank `rank` holds, in the order it holds them."""
    return rank, 2 * cp - 1 - rank


def zigzag_positions(seq_length: int, cp: int, rank: int, device: torch.device | None = None) -> torch.Tensor:
    """The positions in the full sequence of the tokens rank `rank` holds, in its order."""
    chunk = seq_length // (2 * cp)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in chunk_ids(rank, cp)])


def split_for_context_parallel(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This cp rank's tokens, labels and loss mask of a microbatch ([batch, seq] each, and so
    per-sample "position_ids" and "doc_start" when the batch has them: the positions within each
    document and the documents' starts, in the whole sequence), and their positions
    ("position_ids", [seq/cp], unless per sample); the batch itself when cp is 1."""
    grid = parallel_state.get_grid()
    cp = grid.size("cp")
    if cp == 1:
        return batch
    positions = zigzag_positions(batch["tokens"].shape[1], cp, grid.index("cp"), batch["tokens"].device)
    # Per-sample entries ([b]: the documents' statistics) are not split.
    local = {name: t.index_select(1, positions).contiguous() if t.dim() > 1 else t for name, t in batch.items()}
    return {"position_ids": positions, **local}
