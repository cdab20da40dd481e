"""The pack in a real headless ComfyUI (../shared/comfy_harness): import, /object_info, and the shipped
workflows run unmodified on tiny stand-in models (made by `python -m emocast_lib make-tiny-models`,
NOT a real model: the video is noise, but every node and core node runs for real).

Runs when COMFY_DIR and COMFY_VENV point at a tree prepared by comfy_harness/setup.sh; set
EMOCAST_TINY_MODELS to reuse an existing make-tiny-models folder.
"""
from __future__ import annotations

import ast
import http.client
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from emocast_lib import layout

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT.parent / "shared" / "comfy_harness" / "run_workflow.py"
COMFY_DIR, COMFY_VENV = os.environ.get("COMFY_DIR"), os.environ.get("COMFY_VENV")
pytestmark = [pytest.mark.comfy, pytest.mark.slow]
NO_COMFY = not (COMFY_DIR and COMFY_VENV and Path(COMFY_DIR, "main.py").is_file() and HARNESS.is_file())


def needs_comfy(test):
    """Skipped, by name, where no real ComfyUI is prepared."""
    return pytest.mark.skipif(NO_COMFY, reason=f"{test.__name__}: needs a real ComfyUI: set COMFY_DIR and "
                                               "COMFY_VENV to a tree prepared by comfy_harness/setup.sh")(test)

WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
INPUTS = ROOT / "example_workflows" / "inputs"
EMOCAST_NODES = {"EmoCASTModelLoader", "EmoCASTVocalSeparator", "EmoCASTAudioEncode", "EmoCASTEmotionEncode",
                 "EmoCASTEmotionSchedule", "EmoCASTFaceAnalysis", "EmoCASTCropPortrait", "EmoCASTPasteBack",
                 "EmoCASTSampler", "EmoCASTSamplerToVideo", "EmoCASTMixAudio"}


def harness(*args: str, timeout: float = 600, pack: Path = ROOT) -> dict:
    proc = subprocess.run([sys.executable, str(HARNESS), "--pack", str(pack), "--comfy-dir", COMFY_DIR,
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


@needs_comfy
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
    # Face Analysis takes core's face landmarks exactly where this ComfyUI has them (0.33.0 and newer)
    optional = info["EmoCASTFaceAnalysis"]["input"].get("optional", {})
    if Path(COMFY_DIR, "comfy_extras", "nodes_mediapipe.py").is_file():
        assert optional["face_landmarks"][0] == "FACE_LANDMARKS"
    else:
        assert "face_landmarks" not in optional
    custom = {t for node in EMOCAST_NODES for t in info[node]["output"] if t.startswith("EMOCAST_")}
    assert custom == {"EMOCAST_MODEL", "EMOCAST_AUDIO", "EMOCAST_EMOTION", "EMOCAST_FACE", "EMOCAST_CROP_INFO"}


def manager_installed_copies() -> list[Path]:
    """This pack's folders in ComfyUI's own custom_nodes/ (where ComfyUI-Manager installs it; .ci/run does)."""
    folder = Path(COMFY_DIR or "", "custom_nodes")
    return sorted(d for d in folder.glob("*") if (d / "pyproject.toml").is_file() and (d / "nodes").is_dir()
                  and 'name = "emocast"' in (d / "pyproject.toml").read_text())


@needs_comfy
def test_the_copy_comfyui_manager_installed_lists_every_node():
    """The folder `cm-cli install` made (clone, requirements.txt, install.py) loads in ComfyUI as it is."""
    copies = manager_installed_copies()
    if not copies:
        pytest.skip(f"no ComfyUI-Manager install of the pack in {COMFY_DIR}/custom_nodes: .ci/run makes one with "
                    "`cm-cli install file://localhost/<clone>`")
    summary = harness("--object-info-only", pack=copies[0])
    assert summary["ok"] and not summary["pack_import"]["failed"], summary.get("pack_import")
    assert set(summary["pack_nodes"]) == EMOCAST_NODES


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


@needs_comfy
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
    tracks = [n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "LoadAudio"]
    longest = max(soundfile.info(str(INPUTS / track)).duration for track in tracks)  # a conversation: the longest
    video = _mp4_streams(videos[0])
    assert video["rate"] == fps
    assert video["frames"] == math.ceil(longest * fps)
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


@needs_comfy
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


@contextmanager
def comfy_server(base: Path, tiny_models: Path):
    """The pack in a real ComfyUI server (the harness's ComfyServer: --cpu, a throw-away base directory, the
    tiny models as extra model paths), stopped afterwards."""
    sys.path.insert(0, str(HARNESS.parent))
    try:
        from run_workflow import ComfyServer
    finally:
        sys.path.remove(str(HARNESS.parent))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folders = [f"{d.name}={d}" for d in sorted(tiny_models.iterdir()) if d.is_dir()]
    server = ComfyServer(COMFY_DIR, str(Path(COMFY_VENV, "bin", "python")), ROOT, port, base, folders, [],
                         base / "comfyui.log")
    server.prepare([])
    server.start()
    try:
        assert server.wait_ready(300), server.log_text()[-3000:]
        yield server
    finally:
        server.stop()


def http_json(server, path: str, body: dict | None = None) -> dict:
    """GET (or POST `body` to) the local server's `path`; its JSON answer."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.request("GET" if body is None else "POST", path, None if body is None else json.dumps(body),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
        assert response.status == 200, answer
        return answer
    finally:
        connection.close()


def run_through_server(server, prompt: dict, extra_data: dict, timeout: float = 1200) -> dict:
    """POST /prompt as the frontend does (with its extra_data), then the finished /history entry."""
    prompt_id = http_json(server, "/prompt", {"prompt": prompt, "client_id": "emocast-tests",
                                              "extra_data": extra_data})["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = http_json(server, f"/history/{prompt_id}")
        if prompt_id in history:
            return history[prompt_id]
        assert server.proc.poll() is None, server.log_text()[-3000:]
        time.sleep(0.5)
    pytest.fail(f"the prompt did not finish in {timeout} s")


def mp4_tags(path: Path) -> dict:
    import av

    with av.open(str(path)) as container:
        assert container.streams.audio, f"{path.name} has no sound"
        return dict(container.metadata)


@needs_comfy
def test_sampler_to_video_embeds_the_workflow_as_core_save_video_does(tiny_models: Path, tmp_path: Path):
    """Through the server as the frontend queues a workflow (the UI workflow in extra_data.extra_pnginfo):
    EmoCAST Sampler To Video's mp4, streamed beside the template's core Save Video, carries the same prompt
    and workflow tags as core's, so dropping it onto ComfyUI loads the workflow."""
    sys.path.insert(0, str(HARNESS.parent))
    try:
        from ui_to_api import convert_ui_to_api
    finally:
        sys.path.remove(str(HARNESS.parent))
    ui = json.loads((ROOT / "example_workflows" / "emocast_talking_portrait.json").read_text())
    with comfy_server(tmp_path / "base", tiny_models) as server:
        prompt, _ = convert_ui_to_api(ui, http_json(server, "/object_info"))
        sampler = next(node for node in prompt.values() if node["class_type"] == "EmoCASTSampler")
        prompt["stream"] = {"class_type": "EmoCASTSamplerToVideo",
                            "inputs": {**sampler["inputs"], "filename_prefix": "emo/stream"}}
        done = run_through_server(server, prompt, {"extra_pnginfo": {"workflow": ui}})
        assert done["status"]["status_str"] == "success", done["status"]
    videos = sorted((tmp_path / "base" / "output").rglob("*.mp4"))
    ours = [v for v in videos if v.parent.name == "emo"]
    assert len(videos) == 2 and len(ours) == 1, videos
    tags, core = mp4_tags(ours[0]), mp4_tags(next(v for v in videos if v not in ours))
    assert {k: tags[k] for k in ("prompt", "workflow")} == {k: core[k] for k in ("prompt", "workflow")}
    assert json.loads(tags["workflow"]) == ui
    # the prompt as queued (the server adds its own bookkeeping, e.g. is_changed, to each node)
    assert {k: node["inputs"] for k, node in json.loads(tags["prompt"]).items()} == {
        k: node["inputs"] for k, node in prompt.items()}
    assert not list((tmp_path / "base" / "output").rglob("*.part"))
