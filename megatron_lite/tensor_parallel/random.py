"""The model-parallel RNG (Megatron's RNG states tracker), and activation recomputation that
replays it.

Dropout must draw the same mask on every tp rank where they hold the same tensor (the hidden
dropout on the full residual stream without sequence parallelism: the ranks compute the same
values and must go on doing so) and different masks where each holds different elements (the
attention probabilities of its own heads; under SP the residual stream's own tokens). The
default generator, seeded with seed + 100 x pp rank on every rank (so stages draw differently,
tp ranks alike), serves the replicated regions. A second state, seeded with seed + 100 x pp
rank + 2718 + tp rank, serves the split ones: `fork()` swaps it in around them and keeps its
advance. As in Megatron, under SP the whole stack of layers runs forked (every dropout there is
on this rank's tokens), and without SP only core attention's dropout is.

torch.utils.checkpoint replays a region in backward with torch's generator restored to where
it was in the forward; `checkpoint` here restores the tracked states too, so the replay draws
exactly the masks of the first forward. Megatron writes its own checkpoint function for the
same reason; torch's `context_fn` hook lets us keep torch's. Inside a compiled layer
torch.compile traces the checkpoint and replays its own RNG draws; there the hook is left out
(dynamo cannot trace it).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from megatron_lite import parallel_state

MODEL_PARALLEL_RNG = "model-parallel-rng"
TP_SEED_OFFSET = 2718  # Megatron's offset of the tensor-parallel seed


def _get_state(device_type: str) -> torch.Tensor:
    return torch.cuda.get_rng_state() if device_type == "cuda" else torch.get_rng_state()


def _set_state(device_type: str, state: torch.Tensor) -> None:
    if device_type == "cuda":
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named generator states of the device the model runs on, swapped in by fork()."""

    def __init__(self) -> None:
        self.states: dict[str, torch.Tensor] = {}
        self.device_type = "cpu"
        self.replaying = False  # a recomputation is replaying a forward now

    def seed(self, name: str, seed: int) -> None:
        """Start the state `name` from `seed`, leaving the current generator as it was."""
        current = _get_state(self.device_type)
        if self.device_type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self.states[name] = _get_state(self.device_type)
        _set_state(self.device_type, current)

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states = {name: state.clone() for name, state in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Draw from the state `name` inside the block; the default generator is left as it was.
        A model run without model_parallel_seed (a test, a tool) gets the tensor-parallel state
        from torch's initial seed."""
        if name not in self.states:
            self.seed(name, torch.initial_seed() + TP_SEED_OFFSET + parallel_state.get_grid().coord("tp"))
        current = _get_state(self.device_type)
        _set_state(self.device_type, self.states[name])
        try:
            yield
        finally:
            self.states[name] = _get_state(self.device_type)
            _set_state(self.device_type, current)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def model_parallel_seed(seed: int, device: torch.device) -> None:
    """Seed the default generator (seed + 100 x pp rank: the same on every tp rank) and the
    tensor-parallel state (that + 2718 + tp rank) on `device`'s generator."""
    grid = parallel_state.get_grid()
    default = seed + 100 * grid.coord("pp")
    torch.manual_seed(default)  # the CPU generator and every CUDA device's
    _TRACKER.device_type = device.type
    _TRACKER.states = {}
    _TRACKER.seed(MODEL_PARALLEL_RNG, default + TP_SEED_OFFSET + grid.coord("tp"))


def replaying() -> bool:
    """Whether a recomputation is replaying a forward now (statistics must not count it twice)."""
    return _TRACKER.replaying


class _Replay:
    """The tracked RNG states as they were at a checkpointed forward, while backward replays it.
    Reusable: a backward split in two (zero-bubble schedules) may replay the same forward twice."""

    def __init__(self, at_forward: dict[str, torch.Tensor]) -> None:
        self.at_forward = at_forward

    def __enter__(self) -> None:
        self.now = _TRACKER.get_states()
        _TRACKER.set_states(self.at_forward)
        _TRACKER.replaying = True

    def __exit__(self, *exc) -> None:
        _TRACKER.replaying = False
        _TRACKER.set_states(self.now)


def checkpoint(function: Callable, *args: torch.Tensor) -> torch.Tensor:
    """function(*args) without keeping its intermediates: backward replays it, with torch's
    generator and the tracked states as they were in the forward."""
    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), _Replay(_TRACKER.get_states())
    if torch.compiler.is_compiling():  # inside a compiled layer: torch.compile replays its own RNG draws
        return torch_checkpoint(function, *args, use_reentrant=False, preserve_rng_state=True)
    return torch_checkpoint(function, *args, use_reentrant=False, context_fn=contexts, preserve_rng_state=True)


def checkpointed(function: Callable, recompute: bool) -> Callable:
    """`function`, or with `recompute` the same computed without keeping its intermediates
    (selective recomputation: backward replays it)."""
    return (lambda *args: checkpoint(function, *args)) if recompute else function
