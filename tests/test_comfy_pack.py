"""The pack in a real headless ComfyUI (../shared/comfy_harness): import, /object_info, and the shipped
workflows run unmodified on tiny stand-in models (made by `python -m emocast_lib make-tiny-models`,
NOT a real model: the video is noise, but every node and core node runs for real).

Runs when COMFY_DIR and COMFY_VENV point at a tree prepared by comfy_harness/setup.sh; set
EMOCAST_TINY_MODELS to reuse an existing make-tiny-models folder.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT.parent / "shared" / "comfy_harness" / "run_workflow.py"
COMFY_DIR, COMFY_VENV = os.environ.get("COMFY_DIR"), os.environ.get("COMFY_VENV")
pytestmark = pytest.mark.skipif(
    not (COMFY_DIR and COMFY_VENV and Path(COMFY_DIR, "main.py").is_file() and HARNESS.is_file()),
    reason="needs a real ComfyUI: set COMFY_DIR and COMFY_VENV to a tree prepared by comfy_harness/setup.sh")

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
INPUTS = ROOT / "workflows" / "inputs"
EMOCAST_NODES = {"EmoCASTModelLoader", "EmoCASTVocalSeparator", "EmoCASTAudioEncode", "EmoCASTEmotionEncode",
                 "EmoCASTEmotionSchedule", "EmoCASTFaceAnalysis", "EmoCASTCropPortrait", "EmoCASTSampler",
                 "EmoCASTSamplerToVideo"}


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


def _mp4_streams(path: Path) -> tuple[int, float, list[str]]:
    import av

    with av.open(str(path)) as container:
        kinds = [s.type for s in container.streams]
        rate = float(container.streams.video[0].average_rate)
        frames = sum(1 for _ in container.decode(video=0))
    return frames, rate, kinds


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_shipped_workflow_makes_mp4_with_sound(workflow: Path, tiny_models: Path):
    ui = json.loads(workflow.read_text())
    assert "nodes" in ui and "links" in ui, "templates must be UI-format workflows"
    summary = harness("--workflow", str(workflow), "--input", str(INPUTS / "portrait.png"),
                      "--input", str(INPUTS / "speech.wav"),
                      "--extra-model-path", f"emocast={tiny_models / 'emocast'}",
                      "--extra-model-path", f"vae={tiny_models / 'vae'}",
                      "--extra-model-path", f"text_encoders={tiny_models / 'text_encoders'}",
                      "--timeout", "1500", "--keep", timeout=1800)
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
    frames, rate, kinds = _mp4_streams(videos[0])
    assert rate == fps
    assert frames == math.ceil(soundfile.info(str(INPUTS / "speech.wav")).duration * fps)
    assert "audio" in kinds
