"""Zero-bubble pipeline schedules (Qi et al., "Zero Bubble Pipeline Parallelism", 2023): each
backward is split into B (the input's gradient, which the previous stage waits for) and W (the
weights' gradients, which nobody waits for; split_backward.py), and W passes are held back to
fill the time a stage would otherwise spend waiting.

ZB-H1 keeps 1F1B's order of forwards and B passes, with the W of each microbatch right after
its B, except that stage r holds back its first r W passes and runs them at the end, where
1F1B's drain leaves it idle. With F, B and W of equal cost that leaves (p-1)(F+B-W) of idle
time per step against 1F1B's (p-1)(F+B+W): a third. No stage keeps more than p microbatches'
activations alive (an activation lives from F to W), 1F1B's peak, which 1F1B reaches on its
first stage.

A schedule is the list of passes each rank runs, in order; `run_order` runs one, deriving the
point-to-point messages from every rank's list instead of hand-placing them as the 1F1B
schedules do (schedules.py). Each message is sent as soon as it is produced; a rank posts the
receive of a message when it needs it, together with every earlier message from that peer,
in the order the peer sends them, so that sends and receives always match.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

import torch

from megatron_lite import parallel_state
from megatron_lite.comm import send_recv_async
from megatron_lite.pipeline_parallel.p2p import BACKWARD_TAG, FORWARD_TAG

Action = tuple[str, int, int]  # ("F" | "B" | "W", virtual stage, microbatch)
Message = tuple[str, int, int]  # ("F": an activation | "B": a gradient, the stage that sent it, microbatch)


class SplitStageRunner(Protocol):
    tensor_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device | None

    def forward(self, chunk: int, microbatch: int, input_tensor: torch.Tensor | None) -> torch.Tensor: ...

    def backward_input(self, chunk: int, microbatch: int, input_tensor: torch.Tensor | None,
                       output_tensor: torch.Tensor, output_grad: torch.Tensor | None) -> torch.Tensor | None: ...

    def backward_weight(self, chunk: int, microbatch: int) -> None: ...


def zb_h1_order(p: int, r: int, m: int) -> list[Action]:
    """Stage r's passes under ZB-H1: 1F1B's warmup forwards, then F and B alternating, each B
    followed by the W of the oldest microbatch still waiting for one once r have been held back;
    the held-back W passes last."""
    warmup = min(p - r - 1, m)
    order: list[Action] = [("F", r, i) for i in range(warmup)]
    weights = deque()
    for i in range(m):
        if warmup + i < m:
            order.append(("F", r, warmup + i))
        order.append(("B", r, i))
        weights.append(i)
        if i >= r:
            order.append(("W", r, weights.popleft()))
    order += [("W", r, i) for i in weights]
    return order


def zbv_order(p: int, r: int, m: int) -> list[Action]:
    """Rank r's passes under ZB-V: two chunks per rank placed in a V, virtual stage r going
    down the ranks and 2p-1-r coming back up, so the first and the last stage (embedding and
    loss) are both on rank 0 and a microbatch turns round on rank p-1 without a message.

    The handcrafted schedule of the zero-bubble paper (torch.distributed.pipelining's
    ScheduleZBVZeroBubble runs the same one): chunk 0 forwards to fill the V, then chunk 1's
    F, B and W as its gradients start to come back, a steady phase of F, B, W on each chunk in
    turn, and a drain of B passes with the W passes held back to its end. Written for at least
    2p-1 microbatches; with fewer, the passes of the missing ones are left out.
    """
    down, up = r, 2 * p - 1 - r
    n = max(m, 2 * p - 1)
    order: list[Action] = []
    count = {key: 0 for key in ("F0", "F1", "B0", "B1", "W0", "W1")}

    def run(kind: str, chunk: int) -> None:
        key = f"{kind}{chunk}"
        order.append((kind, down if chunk == 0 else up, count[key]))
        count[key] += 1
    for _ in range(2 * (p - r) - 1):
        run("F", 0)
    for _ in range(r):
        run("F", 1)
        run("F", 0)
    for _ in range(p - r):
        run("F", 1), run("B", 1), run("W", 1)
    while count["F1"] < count["F0"] or count["F0"] < n:
        if count["F0"] < n:
            run("F", 0)
        run("B", 0), run("W", 0)
        run("F", 1), run("B", 1), run("W", 1)
    for _ in range(r):
        run("B", 0), run("B", 1)
    for _ in range(p - r):
        run("B", 0), run("W", 0)
    while count["W1"] < count["B1"]:
        run("W", 1)
    while count["W0"] < count["B0"]:
        run("W", 0)
    return [action for action in order if action[2] < m]


def v_placement(p: int) -> Callable[[int], tuple[int, int]]:
    """(pipeline rank, chunk) of each virtual stage in ZB-V's V."""
    return lambda stage: (stage, 0) if stage < p else (2 * p - 1 - stage, 1)


def _messages(order: list[Action], sender: int, receiver: int, num_stages: int,
              rank_of: Callable[[int], int]) -> list[Message]:
    """The messages `sender` sends `receiver` while running `order`, in the order it sends them."""
    sent = []
    for kind, stage, mb in order:
        if kind == "F" and stage < num_stages - 1 and rank_of(stage + 1) == receiver != sender:
            sent.append(("F", stage, mb))
        elif kind == "B" and stage > 0 and rank_of(stage - 1) == receiver != sender:
            sent.append(("B", stage, mb))
    return sent


def run_order(runner: SplitStageRunner, orders: list[list[Action]], num_stages: int,
              place: Callable[[int], tuple[int, int]]) -> None:
    """Run this rank's passes of `orders` (one list per pipeline rank); place(stage) is the
    (pipeline rank, model chunk) that holds a virtual stage."""
    grid = parallel_state.get_grid()
    me, members = grid.coord("pp"), grid.members("pp")

    def rank_of(stage: int) -> int:
        return place(stage)[0]
    expected = {peer: deque(_messages(orders[peer], peer, me, num_stages, rank_of))
                for peer in range(len(orders)) if peer != me}
    arrived: dict[Message, tuple[torch.Tensor, list]] = {}
    local: dict[Message, torch.Tensor] = {}  # between two chunks of this rank
    sends: list = []

    def tag(message: Message) -> int:
        return FORWARD_TAG if message[0] == "F" else BACKWARD_TAG

    def deliver(message: Message, tensor: torch.Tensor, to: int) -> None:
        if to == me:
            local[message] = tensor.detach()
            return
        # A send in flight holds its tensor: let go of those already received, not at the step's end.
        sends[:] = [work for work in sends if not work.is_completed()]
        sends.extend(send_recv_async([("send", tensor.detach().contiguous(), members[to], tag(message))], "pp"))

    def receive(message: Message, frm: int) -> torch.Tensor:
        if frm == me:
            return local.pop(message)
        while message not in arrived:
            nxt = expected[frm].popleft()
            buffer = torch.empty(runner.tensor_shape, dtype=runner.dtype, device=runner.device)
            arrived[nxt] = (buffer, send_recv_async([("recv", buffer, members[frm], tag(nxt))], "pp"))
        buffer, works = arrived.pop(message)
        for work in works:
            work.wait()
        return buffer

    inputs: dict[tuple[int, int], torch.Tensor | None] = {}
    outputs: dict[tuple[int, int], torch.Tensor] = {}

    # One function per pass, so that no local variable keeps a microbatch's tensors (and with
    # them its graph) alive after the pass that last needs them.
    def forward(stage: int, mb: int) -> None:
        x = None if stage == 0 else receive(("F", stage - 1, mb), rank_of(stage - 1))
        y = runner.forward(place(stage)[1], mb, x)
        inputs[stage, mb], outputs[stage, mb] = x, y
        if stage < num_stages - 1:
            deliver(("F", stage, mb), y, rank_of(stage + 1))

    def backward_input(stage: int, mb: int) -> None:
        grad = None if stage == num_stages - 1 else receive(("B", stage + 1, mb), rank_of(stage + 1))
        grad_in = runner.backward_input(place(stage)[1], mb, inputs.pop((stage, mb)), outputs.pop((stage, mb)), grad)
        if stage > 0:
            deliver(("B", stage, mb), grad_in, rank_of(stage - 1))

    passes = {"F": forward, "B": backward_input, "W": lambda stage, mb: runner.backward_weight(place(stage)[1], mb)}
    for kind, stage, mb in orders[me]:
        passes[kind](stage, mb)
    for work in sends:
        work.wait()


def forward_backward_zb_h1(runner: SplitStageRunner, num_microbatches: int) -> None:
    """One step under ZB-H1 (one model chunk per rank)."""
    p = parallel_state.get_grid().size("pp")
    orders = [zb_h1_order(p, r, num_microbatches) for r in range(p)]
    run_order(runner, orders, p, lambda stage: (stage, 0))


def forward_backward_zbv(runner: SplitStageRunner, num_microbatches: int) -> None:
    """One step under ZB-V (two model chunks per rank, in a V)."""
    p = parallel_state.get_grid().size("pp")
    orders = [zbv_order(p, r, num_microbatches) for r in range(p)]
    run_order(runner, orders, 2 * p, v_placement(p))


def forward_only_zbv(runner: SplitStageRunner, num_microbatches: int) -> None:
    """Evaluation in the V: each microbatch down the ranks on chunk 0 and back up on chunk 1."""
    p = parallel_state.get_grid().size("pp")
    orders = [[("F", stage, i) for i in range(num_microbatches) for stage in (r, 2 * p - 1 - r)] for r in range(p)]
    run_order(runner, orders, 2 * p, v_placement(p))
