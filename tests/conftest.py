"""Shared fixtures: tiny / synthetic SDXL factories, the tiny diffusers config folder, and
isolation of mergekit's class-level loader cache between tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--heavy",
        action="store_true",
        default=False,
        help="also run the heavy tests (more cases of the slow end-to-end files; several minutes more)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    # Heavy cases repeat what a lighter case of the same test covers, for more methods or
    # options; CI runs the light set to stay well under its time limit.
    if config.getoption("--heavy") or os.environ.get("MERGEKIT_SDXL_HEAVY_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="heavy: run with --heavy or MERGEKIT_SDXL_HEAVY_TESTS=1")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def synthetic_sdxl_factory(tmp_path):
    """``make(name, seed=0, base=None, **kw) -> Path``: a width-scaled synthetic SDXL (~40 MB at 1/16)."""
    from mergekit_sdxl.sdxl.tiny import write_synthetic_sdxl

    def make(name: str, seed: int = 0, base=None, **kw) -> Path:
        path = tmp_path / (name if name.endswith(".safetensors") else f"{name}.safetensors")
        write_synthetic_sdxl(path, seed=seed, base=base, **kw)
        return path

    return make


@pytest.fixture
def tiny_sdxl_factory(tmp_path):
    """``make(name, seed=0, base=None, **kw) -> Path``: a tiny diffusers-loadable SDXL file."""
    from mergekit_sdxl.sdxl.tiny import write_tiny_sdxl

    def make(name: str, seed: int = 0, base=None, **kw) -> Path:
        path = tmp_path / (name if name.endswith(".safetensors") else f"{name}.safetensors")
        write_tiny_sdxl(path, seed=seed, base=base, **kw)
        return path

    return make


@pytest.fixture(scope="session")
def tiny_config_dir(tmp_path_factory) -> Path:
    """Local diffusers config folder for ``from_single_file(..., config=tiny_config_dir)``."""
    from mergekit_sdxl.sdxl.tiny import write_tiny_config_dir

    return write_tiny_config_dir(tmp_path_factory.mktemp("tiny_sdxl_config"))


@pytest.fixture(autouse=True)
def _clear_mergekit_loader_cache():
    """mergekit's LoaderCache keeps open loaders in a class-level dict across tests: clear it.

    Only touches mergekit when a test already imported it (an unimported module has no cache),
    so pure-format tests never pay mergekit's import time.
    """
    yield
    if sys.modules.get("mergekit.io.tasks") is None:
        return
    try:
        from mergekit.io.tasks import LoaderCache
    except ImportError:
        return
    loaders = getattr(LoaderCache, "loaders", None)
    if loaders is not None:
        loaders.clear()
