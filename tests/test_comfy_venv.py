"""Runs the in-process ComfyUI tests (tests/comfy_venv_*.py: the nodes with ComfyUI's own objects, cancel,
determinism, error messages, core's audio encoder, partial loading, the install) under the ComfyUI venv's
python, from the normal test suite. Those files are not named test_*.py, so the normal run does not collect
them under its own python, where ComfyUI is not importable."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFY_DIR, COMFY_VENV = os.environ.get("COMFY_DIR"), os.environ.get("COMFY_VENV")
PYTHON = Path(COMFY_VENV or "", "bin", "python")


@pytest.mark.skipif(not (COMFY_DIR and COMFY_VENV and PYTHON.is_file()),
                    reason="needs a real ComfyUI: set COMFY_DIR and COMFY_VENV to a tree prepared by "
                           "comfy_harness/setup.sh")
def test_nodes_in_comfyui_venv(tmp_path):
    has_pytest = subprocess.run([str(PYTHON), "-c", "import pytest"], capture_output=True).returncode == 0
    if not has_pytest:
        pytest.skip(f"pytest is not installed in {COMFY_VENV}: `{PYTHON} -m pip install pytest`")
    models = os.environ.get("EMOCAST_TINY_MODELS")
    if not models:  # one tiny models tree for every file
        models = str(tmp_path / "tiny_models")
        subprocess.run([sys.executable, "-m", "emocast_lib", "make-tiny-models", models], cwd=ROOT, check=True,
                       capture_output=True, timeout=600)
    files = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("tests/comfy_venv_*.py"))
    proc = subprocess.run([str(PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                          cwd=ROOT, capture_output=True, text=True, timeout=2400,
                          env={**os.environ, "EMOCAST_TINY_MODELS": models})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
