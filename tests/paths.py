"""Paths the tests share, independent of where a test file sits under ``tests/``."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # the repository root
DATA = REPO / "tests" / "data"  # golden digests, TGMD worked examples
CONFIGS = REPO / "configs"  # the example configs
