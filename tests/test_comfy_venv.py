"""The in-process ComfyUI tests (tests/comfy_venv_*.py: the nodes with ComfyUI's own objects, cancel,
determinism, error messages, core's audio encoder and face landmarks, partial loading, the install), each
reported here as its own test with its own failure.

Those files are not named test_*.py, so this suite does not collect them under its own python, where ComfyUI
is not importable. Their test functions are read from the files (every tests/comfy_venv_*.py, found, not
listed) and become one test each here; the first of them to run starts ONE pytest under the ComfyUI venv's
python for all the selected ones (one ComfyUI import, not one per test) with a JUnit report, and each test
here reports its own cases from it (a parametrized function: all its cases). Without a prepared ComfyUI each
is skipped by name with the reason.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFY_DIR, COMFY_VENV = os.environ.get("COMFY_DIR"), os.environ.get("COMFY_VENV")
PYTHON = Path(COMFY_VENV or "", "bin", "python")
VENV_FILES = sorted(ROOT.glob("tests/comfy_venv_*.py"))
pytestmark = [pytest.mark.comfy, pytest.mark.slow]


def venv_test_ids(path: Path) -> list[str]:
    """`file::function` ids of the module-level test functions of one file, in file order."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(ROOT).as_posix()
    return [f"{rel}::{node.name}" for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]


VENV_TESTS = [test for path in VENV_FILES for test in venv_test_ids(path)]


def why_not_runnable() -> str | None:
    if not (COMFY_DIR and COMFY_VENV and PYTHON.is_file()):
        return ("needs a real ComfyUI: set COMFY_DIR and COMFY_VENV to a tree prepared by "
                "comfy_harness/setup.sh")
    if subprocess.run([str(PYTHON), "-c", "import pytest"], capture_output=True).returncode != 0:
        return f"pytest is not installed in {COMFY_VENV}: `{PYTHON} -m pip install pytest`"
    return None


def read_junit(path: Path) -> dict[str, list[tuple[str, str, str]]]:
    """{`file::function`: [(case name, outcome, message + details)]} from pytest's JUnit XML."""
    cases: dict[str, list[tuple[str, str, str]]] = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        module, name = case.get("classname", ""), case.get("name", "")
        key = f"{module.replace('.', '/')}.py::{name.partition('[')[0]}"  # a parametrized case: its function
        outcome, text = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag
                details = "" if child.tag == "skipped" else child.text or ""  # a skip's text repeats its reason
                text = f"{child.get('message', '')}\n{details}".strip()
                break
        cases.setdefault(key, []).append((name, outcome, text))
    return cases


@pytest.fixture(scope="session")
def venv_results(request, tmp_path_factory) -> tuple[dict, str]:
    """Runs the selected in-ComfyUI tests once under the ComfyUI venv: (JUnit cases per test, output tail)."""
    selected = [item.callspec.params["test"] for item in request.session.items
                if item.originalname == "test_in_comfyui" and hasattr(item, "callspec")]
    out = tmp_path_factory.mktemp("comfy_venv")
    models = os.environ.get("EMOCAST_TINY_MODELS")
    if not models:  # one tiny models tree for every file
        models = str(out / "tiny_models")
        subprocess.run([sys.executable, "-m", "emocast_lib", "make-tiny-models", models], cwd=ROOT, check=True,
                       capture_output=True, timeout=600)
    report = out / "junit.xml"
    proc = subprocess.run([str(PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
                           f"--junitxml={report}", *selected], cwd=ROOT, capture_output=True, text=True,
                          timeout=2400, env={**os.environ, "EMOCAST_TINY_MODELS": models})
    tail = (proc.stdout[-3000:] + proc.stderr[-1500:]).strip()
    return (read_junit(report) if report.is_file() else {}), tail


@pytest.mark.parametrize("test", VENV_TESTS, ids=[t.replace(".py::", ".").removeprefix("tests/") for t in VENV_TESTS])
def test_in_comfyui(test: str, request):
    reason = why_not_runnable()
    if reason:
        pytest.skip(f"{test}: {reason}")
    results, tail = request.getfixturevalue("venv_results")
    cases = results.get(test)
    assert cases, f"{test} did not run in ComfyUI's venv (a collection error or a crash?):\n{tail}"
    failed = [f"{name}: {outcome}\n{text}" for name, outcome, text in cases if outcome in ("failure", "error")]
    assert not failed, "\n\n".join(failed)
    skipped = [f"{name}: {text}" for name, outcome, text in cases if outcome == "skipped"]
    if len(skipped) == len(cases):  # e.g. a test of what only a newer ComfyUI has
        pytest.skip(f"in ComfyUI's venv: {'; '.join(skipped)}")
