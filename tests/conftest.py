"""Shared test setup: one cache directory for the built-in corpus per test session."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def corpus_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ.setdefault("MEGATRON_LITE_CACHE", str(tmp_path_factory.mktemp("corpus_cache")))
