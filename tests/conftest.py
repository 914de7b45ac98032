"""Shared test setup: one cache directory for the built-in corpus per test session, the Triton
interpreter for the kernel tests when there is no GPU, and a deadline for every spawn of ranks."""
from __future__ import annotations

import os

import pytest
import torch

from megatron_lite.distributed.spawn import STALL_TIMEOUT_ENV

# `triton.jit` chooses compile-or-interpret when it decorates, i.e. when a `megatron_lite/kernels/`
# module is first imported, so this must be set before any test module is collected.
# It changes nothing for tests that launch no kernel: on CPU the ops call their
# plain-torch reference unless MEGATRON_LITE_TRITON=1, which only `force_triton` sets.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every run_on_ranks in the suite (tests and the tools they call) fails once no rank has made
# progress (completed a collective) for this many seconds, printing each rank's stack, instead
# of waiting for the 5-minute collective timeout of a stuck rank. A tiny model's ranks complete
# collectives every few milliseconds; only spawning a rank (importing torch) takes seconds.
# pytest-timeout (pyproject.toml) is the backstop for anything else that hangs.
os.environ.setdefault(STALL_TIMEOUT_ENV, "60")


@pytest.fixture(scope="session", autouse=True)
def corpus_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ.setdefault("MEGATRON_LITE_CACHE", str(tmp_path_factory.mktemp("corpus_cache")))


@pytest.fixture
def force_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dispatch the ops in `megatron_lite/kernels/` to Triton for this test, even on CPU tensors."""
    monkeypatch.setenv("MEGATRON_LITE_TRITON", "1")
