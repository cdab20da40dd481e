"""The real InsightFace FaceAnalysis and MediaPipe FaceLandmarker code paths, on small stand-in models.

Real antelopev2 / face_landmarker_v2 files cannot exist here, so:
* FAKE InsightFace models are generated as ONNX: an SCRFD-shaped detector (9 outputs; a stride-32 cell
  with a bright red channel is a "face", its green level sets the box size) and an ArcFace-shaped
  recognizer (112x112 -> 512). They go through FaceAnalysis' own model routing, detection, alignment
  and recognition.
* A STAND-IN FaceLandmarker bundle is assembled from mediapipe 0.10.21's face detector and face mesh
  tflite files shipped in emocast_lib/bench/mediapipe_legacy (`tiny.write_stand_in_landmarker`, no download).
  It loads and runs through the Tasks API, but its landmarks are not those of the real bundle, so only
  shapes, placement and the error paths are checked; mask parity uses the fixture landmarks
  (test_preprocess_face_masks.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from emocast_lib import face

# --- fake InsightFace models -------------------------------------------------------------------------

def _save(graph, path: Path) -> None:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def make_fake_scrfd(path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    consts = {
        "c0": [0], "c1": [1], "c2": [2], "flat1": [-1, 1], "flat4": [-1, 4], "flat10": [-1, 10],
    }
    inits = [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in consts.items()]
    inits += [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in {
        "one": [1.0], "two": [2.0], "zero": [0.0], "ones4": [[1.0] * 4],
        # five keypoints (eyes, nose, mouth corners) around the anchor, in box-distance units
        "kps": [[-0.35, -0.3, 0.35, -0.3, 0.0, 0.0, -0.3, 0.35, 0.3, 0.35]]}.items()]
    nodes, outputs = [], {"score": [], "bbox": [], "kps": []}
    node = helper.make_node
    for s in (8, 16, 32):
        p = f"s{s}_"
        nodes += [node("AveragePool", ["input.1"], [p + "pool"], kernel_shape=[s, s], strides=[s, s]),
                  node("Slice", [p + "pool", "c0", "c1", "c1"], [p + "r"]),
                  node("Slice", [p + "pool", "c1", "c2", "c1"], [p + "g"]),
                  node("Reshape", [p + "r", "flat1"], [p + "rf"]),
                  node("Reshape", [p + "g", "flat1"], [p + "gf"])]
        if s == 32:
            nodes.append(node("Identity", [p + "rf"], [p + "s1"]))
        else:  # finer strides never fire
            nodes += [node("Mul", [p + "rf", "zero"], [p + "rz"]), node("Sub", [p + "rz", "one"], [p + "s1"])]
        nodes += [node("Concat", [p + "s1", p + "s1"], [p + "s2"], axis=1),  # two anchors per cell
                  node("Reshape", [p + "s2", "flat1"], [p + "score"]),
                  node("Add", [p + "gf", "one"], [p + "g1"]), node("Mul", [p + "g1", "two"], [p + "d"]),
                  node("Mul", [p + "d", "ones4"], [p + "d4"]), node("Concat", [p + "d4", p + "d4"], [p + "d8"], axis=1),
                  node("Reshape", [p + "d8", "flat4"], [p + "bbox"]),
                  node("Mul", [p + "d", "kps"], [p + "k10"]),
                  node("Concat", [p + "k10", p + "k10"], [p + "k20"], axis=1),
                  node("Reshape", [p + "k20", "flat10"], [p + "kps"])]
        for kind in outputs:
            outputs[kind].append(p + kind)
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, w])
            for kind, w in (("score", 1), ("bbox", 4), ("kps", 10)) for n in outputs[kind]]
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "H", "W"])
    _save(helper.make_graph(nodes, "fake_scrfd", [inp], outs, inits), path)


def make_fake_arcface(path: Path) -> np.ndarray:
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((3 * 8 * 8, 512)).astype(np.float32)
    nodes = [helper.make_node("AveragePool", ["input.1"], ["pool"], kernel_shape=[14, 14], strides=[14, 14]),
             helper.make_node("Flatten", ["pool"], ["flat"]), helper.make_node("MatMul", ["flat", "W"], ["embedding"])]
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 112, 112])
    out = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 512])
    _save(helper.make_graph(nodes, "fake_arcface", [inp], [out], [numpy_helper.from_array(weight, "W")]), path)
    return weight


@pytest.fixture(scope="module")
def fake_insightface_dir(tmp_path_factory) -> Path:
    pytest.importorskip("insightface", reason="optional package insightface is not installed")
    folder = tmp_path_factory.mktemp("fake_antelopev2")
    make_fake_scrfd(folder / "fake_scrfd.onnx")
    make_fake_arcface(folder / "fake_arcface.onnx")
    return folder


@pytest.fixture(scope="module")
def fake_app(fake_insightface_dir: Path):
    return face.load_face_analysis(fake_insightface_dir)


def _canvas(*faces: tuple[int, int, int]) -> np.ndarray:
    """640x640 RGB; each (row, col, green) paints a red 32x32 cell = one fake face (green 255 -> larger box)."""
    img = np.zeros((640, 640, 3), np.uint8)
    for row, col, green in faces:
        img[row * 32:(row + 1) * 32, col * 32:(col + 1) * 32] = (255, green, 0)
    return img


def test_loads_detection_and_recognition_only(fake_app):
    assert set(fake_app.models) == {"detection", "recognition"}
    assert tuple(fake_app.det_size) == (640, 640)


def test_largest_face_raw_embedding(fake_app, fake_insightface_dir: Path):
    import onnxruntime
    from insightface.utils import face_align

    img = _canvas((2, 2, 128), (10, 10, 255))
    ident = face.face_identity(fake_app, img)
    assert ident.num_faces == 2 and "(the largest)" in ident.note
    # the green-255 face: anchor (320, 320), box distances ~4 x stride 32 -> about 256 px wide
    assert ident.bbox[0] > 100 and ident.bbox[2] - ident.bbox[0] > 200, ident.bbox
    # recompute the embedding independently: align the chosen face, run the recognizer, no normalisation
    faces = fake_app.get(np.ascontiguousarray(img[..., ::-1]))
    chosen = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
    crop = face_align.norm_crop(np.ascontiguousarray(img[..., ::-1]), chosen.kps, image_size=112)
    blob = ((crop[..., ::-1].astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
    session = onnxruntime.InferenceSession(str(fake_insightface_dir / "fake_arcface.onnx"),
                                           providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input.1": blob})[0][0]
    np.testing.assert_allclose(ident.embedding, expected, rtol=1e-5, atol=1e-4)
    assert ident.embedding.dtype == np.float32 and abs(np.linalg.norm(ident.embedding) - 1) > 0.5  # raw, not L2-normed
    other = face.face_identity(fake_app, _canvas((2, 2, 128)))
    assert other.num_faces == 1 and not np.allclose(other.embedding, ident.embedding)


def test_image_is_fed_in_bgr_like_the_reference(fake_app):
    """The fake detector fires on red: a red RGB face is found, a blue one is not (channels not swapped twice)."""
    assert face.face_identity(fake_app, _canvas((5, 5, 0))).num_faces == 1
    blue = np.zeros((640, 640, 3), np.uint8)
    blue[160:192, 160:192] = (0, 0, 255)
    with pytest.raises(ValueError):
        face.face_identity(fake_app, blue)


def test_no_face_error_and_zero_option(fake_app):
    with pytest.raises(ValueError, match="no face found.*Crop Portrait.*no identity"):
        face.face_identity(fake_app, np.zeros((300, 400, 3), np.uint8))
    ident = face.face_identity(fake_app, np.zeros((300, 400, 3), np.uint8), allow_no_face=True)
    assert ident.embedding.dtype == np.float64 and ident.embedding.shape == (512,) and not ident.embedding.any()
    assert ident.num_faces == 0 and ident.bbox is None


def test_model_folder_errors(tmp_path: Path, fake_insightface_dir: Path):
    with pytest.raises(FileNotFoundError, match="no InsightFace models"):
        face.load_face_analysis(tmp_path)
    only_rec = tmp_path / "only_rec"
    only_rec.mkdir()
    (only_rec / "r.onnx").write_bytes((fake_insightface_dir / "fake_arcface.onnx").read_bytes())
    with pytest.raises(ValueError, match="no face detection model"):
        face.load_face_analysis(only_rec)
    only_det = tmp_path / "only_det"
    only_det.mkdir()
    (only_det / "d.onnx").write_bytes((fake_insightface_dir / "fake_scrfd.onnx").read_bytes())
    with pytest.raises(ValueError, match="no face recognition model"):
        face.load_face_analysis(only_det)


def test_missing_insightface_says_how_to_install(tmp_path: Path, monkeypatch):
    (tmp_path / "x.onnx").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "insightface", None)  # simulate the optional package being absent
    monkeypatch.setitem(sys.modules, "insightface.app", None)
    with pytest.raises(ImportError, match="pip install --no-deps insightface"):
        face.load_face_analysis(tmp_path)


# --- stand-in FaceLandmarker bundle -------------------------------------------------------------

@pytest.fixture(scope="module")
def stand_in_task(tmp_path_factory) -> Path:
    pytest.importorskip("mediapipe.tasks.python", reason="mediapipe is not installed")
    from emocast_lib.bench.tiny import write_stand_in_landmarker

    task = tmp_path_factory.mktemp("stand_in_landmarker") / "STAND_IN_face_landmarker.task"
    write_stand_in_landmarker(task)
    return task


def test_stand_in_landmarker_runs_through_tasks_api(stand_in_task: Path, preprocess_dir: Path):
    from PIL import Image

    cases = sorted(p.parent for p in (preprocess_dir / "faces").glob("*/landmarks.safetensors"))
    assert cases, f"no face cases in {preprocess_dir / 'faces'}"
    with face.LandmarkDetector(stand_in_task) as detector:
        for case in cases:  # the fixture landmarks came from the same detector model: it finds every face
            rgb = np.asarray(Image.open(case / "image.png").convert("RGB"))
            points = detector(rgb)
            assert points.shape == (478, 2) and points.dtype == np.float64, case.name
            # not usable landmarks (see write_stand_in_landmarker): only check that they are centred on the face
            reference = load_file(case / "landmarks.safetensors")["landmarks_px"]
            lo, hi = reference.min(axis=0), reference.max(axis=0)
            centre = points.mean(axis=0)
            assert ((centre > lo) & (centre < hi)).all(), (case.name, centre, lo, hi)
            masks = face.compute_masks(points, rgb.shape[0], rgb.shape[1])
            assert masks.face_mask.any() and masks.lip_mask.any(), case.name
        with pytest.raises(ValueError, match="no face found for landmarks"):
            detector(np.zeros((256, 256, 3), np.uint8))
        with pytest.raises(ValueError, match=r"RGB uint8 \(H, W, 3\)"):
            detector(np.zeros((256, 256), np.uint8))


def test_landmarker_file_errors(tmp_path: Path):
    pytest.importorskip("mediapipe.tasks.python", reason="mediapipe is not installed")
    with pytest.raises(FileNotFoundError, match="face_landmarker_v2_with_blendshapes.task"):
        face.LandmarkDetector(tmp_path / "missing.task")
    (tmp_path / "junk.task").write_bytes(b"not a bundle")
    with pytest.raises(ValueError, match="not a usable MediaPipe FaceLandmarker bundle"):
        face.LandmarkDetector(tmp_path / "junk.task")
