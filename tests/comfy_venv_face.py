"""EmoCAST Face Analysis fed core's FACE_LANDMARKS (ComfyUI 0.33.0 and newer: comfy_extras/nodes_mediapipe.py,
its pure-PyTorch MediaPipe port) instead of running MediaPipe itself. Core's landmarker needs its own weights
(models/detection), which are not here, so the landmarks are MediaPipe's own for the portrait, put into core's
payload format (float32 pixel coordinates per face, per frame, with the image size). Runs in the ComfyUI venv
with COMFY_DIR set, as tests/comfy_venv_nodes.py (tests/test_comfy_venv.py launches it); on an older ComfyUI,
where the input is absent (tests/test_comfy_pack.py checks that through /object_info), these tests skip.
"""
from __future__ import annotations

import comfy_venv_nodes
import numpy as np
import pytest
import torch

# Importing comfy_venv_nodes puts ComfyUI on sys.path, or skips this module where it is not importable.
comfy_executor, models = comfy_venv_nodes.comfy_executor, comfy_venv_nodes.models

from emocast_lib import face as face_lib
from packimport import pack_module

nodes_face, types, convert = pack_module("face"), pack_module("types"), pack_module("convert")
FACE_MODELS = "face_analysis/models"
needs_core_landmarks = pytest.mark.skipif(
    nodes_face.FaceLandmarksType is None,
    reason="this ComfyUI has no core FACE_LANDMARKS (comfy_extras/nodes_mediapipe.py, ComfyUI 0.33.0 and newer)")


def core_payload(points: np.ndarray, height: int, width: int) -> dict:
    """One face in one frame, as core's Detect Face Landmarks (MediaPipeFaceLandmarker) returns it."""
    face = {"bbox_xyxy": np.concatenate([points.min(0), points.max(0)]).astype(np.float32),
            "blendshapes": {}, "landmarks_xy": points.astype(np.float32),
            "landmarks_3d": np.zeros((len(points), 3), np.float32), "presence": 1.0, "score": 1.0}
    return {"frames": [[face]], "image_size": (height, width), "connection_sets": {}}


@pytest.fixture(scope="module")
def portrait() -> torch.Tensor:
    return comfy_venv_nodes.load_image(comfy_venv_nodes.INPUTS / "emocast_portrait.png")


@needs_core_landmarks
def test_core_landmarks_give_the_masks_and_crop_of_mediapipe_without_running_it(models, portrait, monkeypatch):
    rgb = convert.to_uint8(portrait[0])
    mediapipe = nodes_face.FaceAnalysis.execute(portrait, FACE_MODELS, 1.2, False)
    points = nodes_face.detect_landmarks(nodes_face.face_folder(FACE_MODELS), rgb)
    payload = core_payload(points, *rgb.shape[:2])

    def no_mediapipe(*args, **kwargs):
        raise AssertionError("MediaPipe ran although core's landmarks were connected")

    monkeypatch.setattr(face_lib, "LandmarkDetector", no_mediapipe)
    core = nodes_face.FaceAnalysis.execute(portrait, FACE_MODELS, 1.2, False, face_landmarks=payload)
    assert np.array_equal(core[0].landmarks, payload["frames"][0][0]["landmarks_xy"].astype(np.float64))
    assert np.abs(core[0].landmarks - points).max() < 1e-3  # the same points (float32 in core's payload)
    for name, ours, theirs in zip(("face_region", "face_mask", "lip_mask", "background_mask"),
                                  mediapipe.args[1:], core.args[1:]):
        assert torch.equal(ours, theirs), name
    assert face_lib.crop_portrait(rgb, core[0].landmarks)[1] == face_lib.crop_portrait(rgb, points)[1]


@needs_core_landmarks
def test_core_landmarks_of_another_image_or_without_a_face_are_named(models, portrait):
    rgb = convert.to_uint8(portrait[0])
    points = nodes_face.detect_landmarks(nodes_face.face_folder(FACE_MODELS), rgb)
    height, width = rgb.shape[:2]
    with pytest.raises(types.EmoCASTInputError, match=rf"face_landmarks: .* of a {width + 8}x{height} image, the "
                                                      rf"portrait is {width}x{height}"):
        nodes_face.FaceAnalysis.execute(portrait, FACE_MODELS, 1.2, False,
                                        face_landmarks=core_payload(points, height, width + 8))
    empty = {**core_payload(points, height, width), "frames": [[]]}
    with pytest.raises(types.EmoCASTInputError, match="face_landmarks: they hold no face"):
        nodes_face.FaceAnalysis.execute(portrait, FACE_MODELS, 1.2, False, face_landmarks=empty)
