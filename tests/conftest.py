"""Shared test set-up: one CPU thread (reproducible and fastest here) and the fixture folders.

The fixture folders default to the project's shared fixtures and can be pointed at any other set of
the same form with EMOCAST_PARITY_FIXTURES / EMOCAST_PREPROCESS_FIXTURES.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)

SHARED = ROOT.parent / "shared" / "fixtures"


def _fixture_dir(var: str, default: Path) -> Path:
    path = Path(os.environ.get(var, default)).resolve()
    if not path.is_dir():
        raise pytest.UsageError(f"{var}={path} is not a folder: point it at a fixture set or unset it")
    return path


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return _fixture_dir("EMOCAST_PARITY_FIXTURES", SHARED / "parity" / "tiny")


@pytest.fixture(scope="session")
def preprocess_dir() -> Path:
    return _fixture_dir("EMOCAST_PREPROCESS_FIXTURES", SHARED / "preprocess")


@pytest.fixture(scope="session")
def download_cache(request, tmp_path_factory) -> Path:
    """A folder kept between runs (pytest's cache) for the few files tests fetch from PyPI."""
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir("downloads")) if cache is not None else tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="session")
def tiny_models(download_cache, tmp_path_factory) -> Path:
    """One tree of tiny stand-in models (`make-tiny-models`: FAKE fill-rule weights, NOT EmoCAST) shared
    by every test of the session; tests must not change it."""
    from emocast_lib.tiny import make_tiny_models

    root = tmp_path_factory.mktemp("tiny_models")
    with pytest.MonkeyPatch.context() as env:
        # The stand-in landmarker is assembled from the mediapipe 0.10.21 wheel: keep it between runs.
        env.setenv("EMOCAST_MEDIAPIPE_WHEEL_DIR", str(download_cache))
        make_tiny_models(root)
    return root
