"""Runs the in-process ComfyUI tests (tests/comfy_venv_*.py: the nodes with ComfyUI's own objects, cancel,
determinism, error messages) under the ComfyUI venv's python, from the normal test suite. Those files are
not named test_*.py, so the normal run does not collect them under its own python (where ComfyUI is not
importable)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFY_DIR, COMFY_VENV = os.environ.get("COMFY_DIR"), os.environ.get("COMFY_VENV")
PYTHON = Path(COMFY_VENV or "", "bin", "python")
MODULES = sorted((ROOT / "tests").glob("comfy_venv_*.py"))


@pytest.mark.skipif(not (COMFY_DIR and COMFY_VENV and PYTHON.is_file()),
                    reason="needs a real ComfyUI: set COMFY_DIR and COMFY_VENV to a tree prepared by "
                           "comfy_harness/setup.sh")
@pytest.mark.parametrize("module", MODULES, ids=[m.stem for m in MODULES])
def test_in_comfyui_venv(module: Path):
    has_pytest = subprocess.run([str(PYTHON), "-c", "import pytest"], capture_output=True).returncode == 0
    if not has_pytest:
        pytest.skip(f"pytest is not installed in {COMFY_VENV}: `{PYTHON} -m pip install pytest`")
    proc = subprocess.run([str(PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           str(module.relative_to(ROOT))], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
