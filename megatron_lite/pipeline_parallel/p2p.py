"""Send and receive activations (forward) and their gradients (backward) between pipeline neighbours.

Stages form a ring over the pp group: the next of the last stage is the first, which the
interleaved schedule uses to pass virtual stage k*pp - 1 on to virtual stage k*pp. All the
sends and receives of one schedule step are posted together and then waited on, so two
neighbours that both send before they receive cannot block each other. Forward traffic and
backward traffic carry different tags and are always posted in the same order (forward
direction first), so with two stages, where next and prev are the same rank, an activation
is never taken for a gradient.
"""
from __future__ import annotations

import torch

from megatron_lite import parallel_state
from megatron_lite.comm import send_recv

FORWARD_TAG, BACKWARD_TAG = 1, 2


def _neighbours() -> tuple[int, int]:
    """Global ranks of the previous and next stage in this rank's pipeline."""
    grid = parallel_state.get_grid()
    ranks, r = grid.members("pp"), grid.index("pp")
    return ranks[(r - 1) % len(ranks)], ranks[(r + 1) % len(ranks)]


def communicate(send_next: torch.Tensor | None = None, send_prev: torch.Tensor | None = None,
                recv_prev: bool = False, recv_next: bool = False, shape: tuple[int, ...] = (),
                dtype: torch.dtype = torch.float32,
                device: torch.device | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One step's exchange: (tensor received from prev, tensor received from next).

    send_next / recv_prev carry activations going forward; send_prev / recv_next carry
    gradients going backward. Received tensors have the agreed `shape` (microbatch, seq or
    seq/tp under sequence parallelism, hidden).
    """
    prev, nxt = _neighbours()
    from_prev = torch.empty(shape, dtype=dtype, device=device) if recv_prev else None
    from_next = torch.empty(shape, dtype=dtype, device=device) if recv_next else None
    ops = []
    if send_next is not None:
        ops.append(("send", send_next.detach().contiguous(), nxt, FORWARD_TAG))
    if from_prev is not None:
        ops.append(("recv", from_prev, prev, FORWARD_TAG))
    if send_prev is not None:
        ops.append(("send", send_prev.detach().contiguous(), prev, BACKWARD_TAG))
    if from_next is not None:
        ops.append(("recv", from_next, nxt, BACKWARD_TAG))
    send_recv(ops, "pp")
    return from_prev, from_next
