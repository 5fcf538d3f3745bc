"""Shared fixtures: isolated Flower/Ray folders, offline Flower, small fast configs."""

from __future__ import annotations

import logging
import os

import pytest

from common.config import RunConfig


@pytest.fixture(autouse=True, scope="session")
def offline_flower(tmp_path_factory):
    home = tmp_path_factory.mktemp("flwr-home")
    ray_tmp = tmp_path_factory.mktemp("ray")
    os.environ.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_HOME=str(home),
        RAY_TMPDIR=str(ray_tmp),
    )


@pytest.fixture(autouse=True)
def fresh_fedtide_logger():
    """The CLI sends fedtide's log to the terminal and stops it there (``propagate`` off);
    undo that after each test so that later tests' ``caplog`` sees fedtide's warnings."""
    yield
    logger = logging.getLogger("fedtide")
    logger.handlers.clear()
    logger.propagate = True


@pytest.fixture
def small_config(tmp_path) -> RunConfig:
    """The default scenario, shortened: a few seconds in-process."""
    return RunConfig.of(rounds_per_task=2, local_epochs=2, out=str(tmp_path / "run"), quiet=True)


@pytest.fixture(autouse=True, scope="session")
def private_idx_cache(tmp_path_factory):
    """Verified IDX files are cached under the user's cache folder; tests keep theirs apart."""
    os.environ["FEDTIDE_CACHE_DIR"] = str(tmp_path_factory.mktemp("fedtide-cache"))
