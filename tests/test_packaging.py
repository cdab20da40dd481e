"""Packaging: pyproject.toml (what the Comfy registry installs) agrees with requirements.txt (what
ComfyUI-Manager installs), carries the registry metadata, and the registry archive is lean: no developer
tooling in it, and no product code that needs the tooling."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# Developer tooling: in the git repository, not in the registry archive.
DEV_TOOLING = ("tests/", ".ci/", ".github/", "emocast_lib/bench/", "requirements-dev.txt")
# The one product module that may import the tooling, inside a function: `make-tiny-models` of the command line.
LAZY_TOOLING_IMPORTS = {"emocast_lib/cli.py"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def _normalised(specs: list[str]) -> dict[str, str]:
    reqs = [Requirement(s) for s in specs]
    return {re.sub(r"[-_.]+", "-", r.name).lower(): str(r.specifier) + (f";{r.marker}" if r.marker else "")
            for r in reqs}


def test_dependencies_match_requirements_txt():
    deps = _pyproject()["project"]["dependencies"]
    assert _normalised(deps) == _normalised(_requirements())
    assert len(deps) == len(_requirements()), "a dependency is listed twice"


def test_no_torch_pin_and_one_opencv():
    names = set(_normalised(_requirements()))
    assert not names & {"torch", "torchvision", "torchaudio"}, "ComfyUI's own torch must win"
    assert len([n for n in names if n.startswith("opencv")]) <= 1, "OpenCV variants share the cv2 module"


def test_registry_metadata():
    data = _pyproject()
    project, comfy = data["project"], data["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,99}", project["name"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"] and project["license"]
    assert project["urls"]["Repository"].startswith("https://")
    assert comfy["PublisherId"]
    assert "EmoCAST" in comfy["DisplayName"]
    assert comfy["Icon"].startswith("https://") and comfy["Icon"].endswith((".png", ".jpg", ".svg", ".gif"))
    assert comfy["requires-comfyui"] == ">=0.3.64"


def test_icon_and_thumbnails_exist():
    icon = _pyproject()["tool"]["comfy"]["Icon"]
    assert (ROOT / icon.split("/main/", 1)[1]).is_file(), "the Icon URL must point at a file of the repo"
    for workflow in (ROOT / "example_workflows").glob("*.json"):
        assert workflow.with_suffix(".jpg").is_file(), f"{workflow.name} has no thumbnail"


def test_web_directory_served_once():
    """WEB_DIRECTORY serves web/; a second registration through [tool.comfy] web would load it twice."""
    assert 'WEB_DIRECTORY = "./web"' in (ROOT / "__init__.py").read_text()
    assert "web" not in _pyproject()["tool"]["comfy"]
    assert list((ROOT / "web").rglob("*.js"))


def _git(*args: str) -> list[str]:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.split()


def test_registry_archive_leaves_out_tests_and_dev_files():
    """`comfy node publish` archives the git-tracked files minus the `.comfyignore` patterns (gitwildmatch, which
    git's own ignore matching implements) plus `[tool.comfy] includes`: users do not download the fixtures."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the registry archive is made from git-tracked files")
    assert "includes" not in _pyproject()["tool"]["comfy"]
    tracked = set(_git("ls-files"))
    archive = tracked - set(_git("ls-files", "--cached", "--ignored", "--exclude-from=.comfyignore"))
    assert not [f for f in archive if f.startswith(DEV_TOOLING)]
    assert {f for f in tracked if f.startswith("emocast_lib/bench/")}, "the tooling moved: update DEV_TOOLING"
    assert {"__init__.py", "pyproject.toml", "requirements.txt", "README.md", "LICENSE"} <= archive
    product = {f for f in tracked if f.startswith(("nodes/", "emocast_lib/", "web/", "example_workflows/"))}
    assert {f for f in product if not f.startswith(DEV_TOOLING)} <= archive
    size = sum((ROOT / f).stat().st_size for f in archive if (ROOT / f).is_file())
    assert size < 5e6, f"the registry archive holds {size / 1e6:.1f} MB of files"  # the pack is ~2 MB


def _imported_modules(path: Path, package: str) -> list[tuple[str, bool]]:
    """(absolute module name, inside a function) of every import of the module at `path`, in `package`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in in_function) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1]) if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            found += [(f"{module}.{alias.name}", id(node) in in_function) for alias in node.names]
    return found


def _package(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).parts[:-1]) or "emocast"  # the pack root is a package too


def test_product_code_does_not_need_the_tooling():
    """The nodes and the library outside emocast_lib/bench/ load and run from the registry archive, which has
    no emocast_lib.bench: none imports it, except the command line's `make-tiny-models` inside its function."""
    product = [p for p in [ROOT / "__init__.py", ROOT / "install.py", *(ROOT / "nodes").rglob("*.py"),
                           *(ROOT / "emocast_lib").rglob("*.py")]
               if p.is_file() and not p.relative_to(ROOT).as_posix().startswith(DEV_TOOLING)]
    assert len(product) > 20
    bad = [f"{p.relative_to(ROOT).as_posix()} imports {module}" + (" in a function" if lazy else "")
           for p in product for module, lazy in _imported_modules(p, _package(p))
           if ".emocast_lib.bench." in f".{module}."  # also `.emocast_lib.bench` from the pack root
           and not (lazy and p.relative_to(ROOT).as_posix() in LAZY_TOOLING_IMPORTS)]
    assert not bad, bad


def test_the_import_check_sees_relative_and_lazy_imports(tmp_path):
    """The check above resolves `from .bench import x`, `from . import bench` and `import emocast_lib.bench`, and
    tells an import inside a function from one at module level."""
    probe = tmp_path / "probe.py"
    probe.write_text("from ..bench.tiny import make_tiny_models\nfrom .. import bench\nimport emocast_lib.bench.fill\n"
                     "from .schema import JobSpec\ndef f():\n    from ..bench import measure\n")
    assert _imported_modules(probe, "emocast_lib.jobs") == [
        ("emocast_lib.bench.tiny.make_tiny_models", False), ("emocast_lib.bench", False),
        ("emocast_lib.bench.fill", False), ("emocast_lib.jobs.schema.JobSpec", False),
        ("emocast_lib.bench.measure", True)]
