"""The shipped templates (example_workflows/) without ComfyUI: where the template browser finds them, the
model files their `models` metadata offers to download (== emocast_lib/layout.py == the README's table),
and the example inputs they name. tests/test_comfy_pack.py runs them in a real ComfyUI."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from emocast_lib import layout

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT / "example_workflows").glob("*.json"))
INPUTS = ROOT / "example_workflows" / "inputs"
# node type -> the layout file its first widget names (the loaders read what the dialog downloads)
LOADERS = {"EmoCASTModelLoader": layout.NET, "EmoCASTAudioEncoderLoader": layout.WAV2VEC,
           "AudioEncoderLoader": layout.WAV2VEC, "VAELoader": layout.VAE, "CLIPLoader": layout.CLIP_L}
FACE_NODES = ("EmoCASTFaceAnalysis", "EmoCASTCropPortrait")


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_templates_are_where_comfyui_looks():
    """ComfyUI serves custom-node templates from example_workflows/ (other folder names are legacy
    aliases, listed a second time by 0.3.64), each with a same-name .jpg thumbnail."""
    assert {t.stem for t in TEMPLATES} >= {"emocast_talking_portrait", "emocast_emotion_schedule", "emocast_any_photo",
                                           "emocast_conversation"}
    for name in ("workflows", "workflow", "examples", "example"):
        assert not (ROOT / name).exists(), f"{name}/ would list the templates twice"
    for template in TEMPLATES:
        assert template.with_suffix(".jpg").is_file(), f"{template.name} has no thumbnail"
        workflow = _load(template)
        assert "nodes" in workflow and "links" in workflow, "templates are UI-format workflows"


@pytest.mark.parametrize("template", TEMPLATES, ids=[t.stem for t in TEMPLATES])
def test_models_metadata_is_the_layout_table(template: Path):
    workflow = _load(template)
    entries = workflow["models"]
    assert sorted(entries, key=lambda e: e["name"]) == sorted((f.metadata() for f in layout.REQUIRED),
                                                              key=lambda e: e["name"])
    for entry in entries:  # what the frontend's missing-models dialog needs of each
        assert entry["url"].startswith("https://") and entry["directory"] and entry["name"]
    for node in workflow["nodes"]:
        assert "models" not in node.get("properties", {}), "one list per template: the top-level `models`"
        if node["type"] in LOADERS:
            assert node["widgets_values"][0] == LOADERS[node["type"]].name, node["type"]
        if node["type"] in FACE_NODES:
            assert node["widgets_values"][0] == layout.FACE_DIR
            assert all(f.folder == "emocast" and f.name.startswith(layout.FACE_DIR + "/")
                       for f in (*layout.IDENTITY, layout.LANDMARKER))


@pytest.mark.parametrize("template", TEMPLATES, ids=[t.stem for t in TEMPLATES])
def test_example_inputs_exist(template: Path):
    named = [n["widgets_values"][0] for n in _load(template)["nodes"] if n["type"] in ("LoadImage", "LoadAudio")]
    assert named and all((INPUTS / name).is_file() for name in named), named


def test_readme_model_table_is_the_layout_table():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("### Model files", 1)[1].split("\n\n", 2)[1]
    rows = [re.findall(r"`([^`]*)`", line) for line in table.splitlines()[2:]]
    listed = {(row[0], row[1]) for row in rows}
    expected = {(f.name, f"models/{f.folder}/") for f in (*layout.REQUIRED, layout.SEPARATOR)}
    assert listed == expected
    for f in (*layout.REQUIRED, layout.SEPARATOR):
        assert f.source in table, f.name


def test_conversation_template_gives_each_face_its_own_track():
    """Two Crop Portraits on one photo with distinct face indices, each into its own sampler with its own
    speech track; the second Paste Back pastes onto the first one's frames; Mix Audio gets both samplers'
    sound; all speakers' Audio Encodes share one fps (the video's)."""
    workflow = _load(ROOT / "example_workflows" / "emocast_conversation.json")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    source = {(link[3], link[4]): link[1] for link in workflow["links"]}  # (to node, input slot) -> from node

    def feeding(node: dict, name: str) -> dict:
        slot = next(i for i, inp in enumerate(node["inputs"]) if inp["name"] == name)
        return nodes[source[(node["id"], slot)]]

    def upstream(node: dict, kind: str) -> dict:
        """The nearest node of type `kind` above `node` (breadth first)."""
        queue = [node]
        while queue:
            current = queue.pop(0)
            for i, inp in enumerate(current["inputs"]):
                parent = nodes.get(source.get((current["id"], i)))
                if parent is not None:
                    if parent["type"] == kind:
                        return parent
                    queue.append(parent)
        raise AssertionError(f"no {kind} above {node['type']}")

    samplers = [n for n in nodes.values() if n["type"] == "EmoCASTSampler"]
    assert len(samplers) == 2
    crops = [upstream(s, "EmoCASTCropPortrait") for s in samplers]
    assert sorted(c["widgets_values"][3] for c in crops) == [0, 1]
    tracks = {upstream(feeding(s, "emocast_audio"), "LoadAudio")["widgets_values"][0] for s in samplers}
    assert len(tracks) == 2
    assert len({upstream(c, "LoadImage")["id"] for c in crops}) == 1, "one photo"
    pastes = [n for n in nodes.values() if n["type"] == "EmoCASTPasteBack"]
    first, second = sorted(pastes, key=lambda p: feeding(p, "photo")["type"] == "EmoCASTPasteBack")
    assert feeding(first, "photo")["type"] == "LoadImage" and feeding(second, "photo") is first
    assert feeding(feeding(second, "frames"), "face") is not feeding(feeding(first, "frames"), "face")
    video = next(n for n in nodes.values() if n["type"] == "CreateVideo")
    assert feeding(video, "images") is second
    mix = feeding(video, "audio")
    assert mix["type"] == "EmoCASTMixAudio"
    assert {feeding(mix, "audio_1")["id"], feeding(mix, "audio_2")["id"]} == {s["id"] for s in samplers}
    assert len({n["widgets_values"][0] for n in nodes.values() if n["type"] == "EmoCASTAudioEncode"}) == 1
