"""The pack in a real headless ComfyUI (../shared/comfy_harness): import, /object_info, and the shipped
workflows run unmodified on tiny stand-in models (made by `python -m emocast_lib make-tiny-models`,
NOT a real model: the video is noise, but every node and core node runs for real).

Runs when COMFY_DIR and COMFY_VENV point at a tree prepared by comfy_harness/setup.sh; set
EMOCAST_TINY_MODELS to reuse an existing make-tiny-models folder.
"""
from __future__ import annotations

import ast
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from emocast_lib import layout

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT.parent / "shared" / "comfy_harness" / "run_workflow.py"
COMFY_DIR, COMFY_VENV = os.environ.get("COMFY_DIR"), os.environ.get("COMFY_VENV")
pytestmark = pytest.mark.skipif(
    not (COMFY_DIR and COMFY_VENV and Path(COMFY_DIR, "main.py").is_file() and HARNESS.is_file()),
    reason="needs a real ComfyUI: set COMFY_DIR and COMFY_VENV to a tree prepared by comfy_harness/setup.sh")

WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
INPUTS = ROOT / "example_workflows" / "inputs"
EMOCAST_NODES = {"EmoCASTModelLoader", "EmoCASTVocalSeparator", "EmoCASTAudioEncode", "EmoCASTEmotionEncode",
                 "EmoCASTEmotionSchedule", "EmoCASTFaceAnalysis", "EmoCASTCropPortrait", "EmoCASTPasteBack",
                 "EmoCASTSampler", "EmoCASTSamplerToVideo"}


def harness(*args: str, timeout: float = 600) -> dict:
    proc = subprocess.run([sys.executable, str(HARNESS), "--pack", str(ROOT), "--comfy-dir", COMFY_DIR,
                           "--venv", COMFY_VENV, *args], capture_output=True, text=True, timeout=timeout)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"harness printed no summary (exit {proc.returncode}): {proc.stderr[-2000:]}")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    given = os.environ.get("EMOCAST_TINY_MODELS")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("tiny_models")
    subprocess.run([sys.executable, "-m", "emocast_lib", "make-tiny-models", str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=600)
    return out


def test_pack_imports_and_every_node_has_tooltips():
    summary = harness("--object-info-only")
    assert summary["ok"], summary
    assert not summary["pack_import"]["failed"], summary["pack_import"]["errors"]
    info = summary["object_info"]
    assert set(summary["pack_nodes"]) == EMOCAST_NODES
    for name in EMOCAST_NODES:
        node = info[name]
        assert node["category"] == "EmoCAST" and node["display_name"].startswith("EmoCAST ")
        assert node["description"]
        for section in ("required", "optional"):
            for key, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{key} has no tooltip"
        assert len(node["output_tooltips"]) == len(node["output"]) and all(node["output_tooltips"]), name
    custom = {t for node in EMOCAST_NODES for t in info[node]["output"] if t.startswith("EMOCAST_")}
    assert custom == {"EMOCAST_MODEL", "EMOCAST_AUDIO", "EMOCAST_EMOTION", "EMOCAST_FACE", "EMOCAST_CROP_INFO"}


def _mp4_streams(path: Path) -> dict:
    import av

    with av.open(str(path)) as container:
        video = container.streams.video[0]
        return {"codecs": {s.type: s.codec_context.name for s in container.streams},
                "rate": float(video.average_rate), "size": (video.width, video.height),
                "frames": sum(1 for _ in container.decode(video=0))}


def model_folders(tiny_models: Path) -> list[str]:
    """--extra-model-path for each models/<folder> of the tiny tree."""
    return [arg for d in sorted(tiny_models.iterdir()) if d.is_dir() for arg in ("--extra-model-path", f"{d.name}={d}")]


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_shipped_workflow_makes_mp4_with_sound(workflow: Path, tiny_models: Path):
    """As a user runs a template: no --input here, the example inputs are the ones the pack put into
    ComfyUI's input folder when it loaded."""
    ui = json.loads(workflow.read_text())
    assert "nodes" in ui and "links" in ui, "templates must be UI-format workflows"
    summary = harness("--workflow", str(workflow), *model_folders(tiny_models), "--timeout", "1500", "--keep",
                      timeout=1800)
    try:
        _check_run(summary, ui)
    finally:
        shutil.rmtree(summary["base_dir"], ignore_errors=True)


def _check_run(summary: dict, ui: dict) -> None:
    import soundfile

    assert summary["ok"], {k: summary.get(k) for k in ("stage", "error", "node_errors", "execution_errors")}
    videos = [Path(f["path"]) for f in summary["files"] if f["path"].endswith(".mp4")]
    assert len(videos) == 1
    encode = next(n for n in ui["nodes"] if n["type"] == "EmoCASTAudioEncode")
    fps = encode["widgets_values"][0]
    speech = next(n for n in ui["nodes"] if n["type"] == "LoadAudio")["widgets_values"][0]
    video = _mp4_streams(videos[0])
    assert video["rate"] == fps
    assert video["frames"] == math.ceil(soundfile.info(str(INPUTS / speech)).duration * fps)
    assert video["codecs"] == {"video": "h264", "audio": "aac"}
    if any(n["type"] == "EmoCASTPasteBack" for n in ui["nodes"]):  # the photo's own size comes out
        photo = next(n for n in ui["nodes"] if n["type"] == "LoadImage")["widgets_values"][0]
        assert video["size"] == Image.open(INPUTS / photo).size


def _listed_suffixes() -> tuple[str, ...]:
    """The model-file suffixes ComfyUI lists (folder_paths.supported_pt_extensions, which its
    /experiment/models listing, and so the missing-models dialog, filters by)."""
    source = Path(COMFY_DIR, "folder_paths.py").read_text()
    return tuple(ast.literal_eval(re.search(r"supported_pt_extensions[^=]*=\s*(\{[^}]*\})", source).group(1)))


BROWSER = bool(shutil.which(os.environ.get("CHROMIUM", "chromium"))) and Path(
    os.environ.get("COMFY_PW_DIR", "/tmp/comfy_pw"), "node_modules", "playwright-core").is_dir()


@pytest.mark.skipif(not BROWSER, reason="needs chromium and playwright-core: comfy_harness/setup.sh WITH_BROWSER=1")
@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_template_loads_in_the_real_frontend(workflow: Path, tiny_models: Path, tmp_path: Path):
    """Loaded by the real frontend in headless Chromium (the harness's --strict-ui check, read here): no
    missing-node dialog and no other alert. The one dialog allowed is the missing-models one naming
    exactly the layout files ComfyUI cannot list (.onnx/.task), all of them present here."""
    summary = harness("--workflow", str(workflow), "--screenshot", str(tmp_path / "shot.png"), "--convert-only",
                      *model_folders(tiny_models))
    shot = summary.get("screenshot") or {}
    assert summary["ok"] and shot.get("ok"), {k: summary.get(k) for k in ("stage", "error", "screenshot")}
    assert not [line for line in shot["logs"] if line.startswith("[dialog]")], shot["logs"]
    unlisted = {f"{f.folder} / {f.name}" for f in layout.REQUIRED if not f.name.endswith(_listed_suffixes())}
    assert all(f.path(tiny_models).exists() for f in layout.REQUIRED)
    for toast in shot["toasts"]:
        assert toast.startswith("Missing Models"), toast
        assert set(re.findall(r"^(\S+ / \S+)$", toast, flags=re.M)) == unlisted, toast
