"""Shared pytest setup: makes tests/ importable (tolerances, cases), seeds every test, registers the `cuda` and `slow`
markers."""
from __future__ import annotations

import os
import sys

import pytest
import torch

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped when torch.cuda.is_available() is False")
    config.addinivalue_line("markers", "slow: a long comparison left out of the default run (pyproject's addopts "
                                       "-m 'not slow'); `python -m pytest -q -m slow` runs them")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="CUDA not available")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seed() -> int:
    """Seed torch's RNG so every test sees fresh but reproducible random data."""
    value = 1234
    torch.manual_seed(value)
    return value


@pytest.fixture
def single_thread_torch():
    """Run torch's own kernels on one thread: on a small shared machine intra-op threads only oversubscribe the
    cores (5x slower backward passes); results of the compared computations do not depend on it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
