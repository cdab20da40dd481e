"""Shared test set-up: one CPU thread (reproducible and fastest here) and the fixture sets.

The floors of the suite (markers registered in pyproject.toml):
    python3 -m pytest tests -m "not slow" -q    # the inner loop, about 2 minutes on 2 cores
    python3 -m pytest tests -m comfy -q         # in or against a real ComfyUI (COMFY_DIR, COMFY_VENV)
    python3 -m pytest tests -m ray -q           # a local Ray runtime
    python3 -m pytest tests -q                  # everything (what `bash .ci/run` runs)
A test that takes more than a few seconds is marked `@pytest.mark.slow` (`--durations=30` finds them).

The fixture sets default to the trimmed copies in tests/fixtures (their README says what was trimmed);
EMOCAST_PARITY_FIXTURES / EMOCAST_PREPROCESS_FIXTURES select any other set of the same form, e.g. the full
ones: EMOCAST_PARITY_FIXTURES=../shared/fixtures/parity/tiny EMOCAST_PREPROCESS_FIXTURES=../shared/fixtures/preprocess
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)

from emocast_lib.bench.fill import fill_state_dict, tensor_sha256  # noqa: E402 (after the sys.path entry)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PARITY_VAR, PREPROCESS_VAR = "EMOCAST_PARITY_FIXTURES", "EMOCAST_PREPROCESS_FIXTURES"


def _fixture_dir(var: str, default: Path, marker: str) -> Path:
    given = os.environ.get(var)
    path = Path(given).resolve() if given else default
    if not (path / marker).exists():
        raise pytest.UsageError(f"{var}={path} is not a fixture set (no {marker} in it): point it at one or unset it")
    return path


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """The parity set's `tiny/` folder (README §1 layout: `real_config/` is its sibling)."""
    return _fixture_dir(PARITY_VAR, FIXTURES / "parity" / "tiny", "tiny_config.json")


@pytest.fixture(scope="session")
def preprocess_dir() -> Path:
    return _fixture_dir(PREPROCESS_VAR, FIXTURES / "preprocess", "faces")


@pytest.fixture(scope="session")
def parity_config(parity_dir: Path) -> dict:
    return json.loads((parity_dir / "tiny_config.json").read_text())


@pytest.fixture(scope="session")
def real_manifest(parity_dir: Path) -> Path:
    """Every key of the released net.pth (the parity set's `real_config/net_state_dict_manifest.tsv`)."""
    path = parity_dir.parent / "real_config" / "net_state_dict_manifest.tsv"
    if not path.is_file():
        raise pytest.UsageError(f"{path} is missing: a parity set keeps real_config/ next to {parity_dir.name}/")
    return path


def read_manifest(path: Path) -> list[dict[str, str]]:
    """Rows of a fixture manifest (.tsv with a header row: key, shape like `512x46080`, dtype, ...)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def manifest_shape(row: dict[str, str]) -> tuple[int, ...]:
    return tuple(int(s) for s in row["shape"].split("x") if s)


def sinusoid_table(max_len: int, width: int) -> torch.Tensor:
    """The motion modules' position table in float64, from the formula of parity README §2."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]
    arg = pos * torch.exp(torch.arange(0, width, 2, dtype=torch.float64) * (-math.log(10000.0) / width))
    table = torch.zeros(1, max_len, width, dtype=torch.float64)
    table[0, :, 0::2], table[0, :, 1::2] = torch.sin(arg), torch.cos(arg)
    return table


def fill_mismatches(seed: int, rows: list[dict[str, str]], filled: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose fill-rule tensor is not the manifest's.

    Random tensors must match the manifest's sha256 bit for bit (torch.randn on a CPU generator is exact).
    The sinusoidal `pos_encoder.pe` tables are checked against the float64 formula instead: float32 exp/sin/cos
    differ in the last bits between CPU instruction sets, so their sha256 depends on the machine that wrote the
    manifest. The rule forms each angle p * exp(-2i ln(10000) / C) in float32, so it is off by a few float32
    ulps of the largest angle (p = max_len - 1); 4 of those ulps (7.6e-6 for 32 positions; measured 1.1e-6)
    pass any correct float32 table, while a wrong formula (order, base, sin/cos swapped) is off by O(1).
    """
    bad = []
    for row in rows:
        ours = filled[row["key"]]
        if row["key"].endswith("pos_encoder.pe"):
            _, max_len, width = ours.shape
            tolerance = 4 * float(np.spacing(np.float32(max_len - 1)))
            if (ours.double() - sinusoid_table(max_len, width)).abs().max() > tolerance:
                bad.append(row["key"])
        elif tensor_sha256(ours) != row["sha256_float32_le"]:
            bad.append(row["key"])
    return bad


@pytest.fixture(scope="session")
def tiny_net_state_dict(parity_dir: Path, parity_config: dict) -> dict[str, torch.Tensor]:
    """The parity set's tiny network filled by the rule (the set ships no weights), checked against its manifest."""
    seed = parity_config["run"]["weight_seed"]
    rows = read_manifest(parity_dir / "tiny_net_manifest.tsv")
    filled = fill_state_dict(seed, {row["key"]: manifest_shape(row) for row in rows})
    bad = fill_mismatches(seed, rows, filled)
    assert not bad, f"{len(bad)} fill-rule tensors differ from tiny_net_manifest.tsv, e.g. {bad[:3]}"
    return filled


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """One tree of tiny stand-in models (`make-tiny-models`: FAKE fill-rule weights, NOT EmoCAST) shared
    by every test of the session; tests must not change it."""
    from emocast_lib.bench.tiny import make_tiny_models

    root = tmp_path_factory.mktemp("tiny_models")
    make_tiny_models(root)
    return root
