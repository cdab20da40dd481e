"""Tiny stand-in models made by the deterministic fill rule: NOT a real model, they produce noise.

They exist so that the code paths of the pack (loading, sampling, ComfyUI workflows, CLI) can be run
end to end on a CPU without the multi-GB released weights. The sizes are those of the parity fixtures.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import CLIP_L_TEXT, SD_VAE, AudioProjConfig, FaceLocatorConfig, ImageProjConfig, NetConfig, UNetConfig
from ..models import EmoCASTNet
from .fill import fill_state_dict

TINY_SEED = 1001
TINY_NET = NetConfig(
    unet=UNetConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=16, heads=4,
                    cross_attention_dim=48, audio_attention_dim=48, audio_token_dim=40, emotive_head_dim=12),
    face_locator=FaceLocatorConfig(out_channels=32),
    image_proj=ImageProjConfig(embedding_dim=24, tokens=4, width=48),
    audio_proj=AudioProjConfig(window=5, layers=3, channels=16, hidden=32, tokens=8, width=40),
    sample_size=128,
)
# The tiny model written by `make-tiny-models`: tiny UNets, but the text width of CLIP-L, the
# 512-d identity of InsightFace and wav2vec2-base's 12 x 768 features, so that ComfyUI's own CLIP-L,
# VAE and audio-encoder loaders take the companion files. Its native size is 64 px to keep CPU runs short.
TINY_PACK_NET = replace(
    TINY_NET, unet=replace(TINY_NET.unet, cross_attention_dim=768, audio_attention_dim=768),
    image_proj=ImageProjConfig(embedding_dim=512, tokens=4, width=768),
    audio_proj=replace(TINY_NET.audio_proj, layers=12, channels=768), sample_size=64)
# The companions' own architectures at a fraction of their widths (same keys, same order).
TINY_VAE: dict[str, Any] = SD_VAE | {
    "layers_per_block": 1, "norm_num_groups": 8, "block_out_channels": [16, 16, 32, 32], "sample_size": 128}
TINY_CLIP_TEXT: dict[str, Any] = CLIP_L_TEXT | {
    "hidden_size": 48, "intermediate_size": 96, "projection_dim": 48, "num_hidden_layers": 2, "num_attention_heads": 4}

NOT_A_MODEL = ("TINY TEST MODELS - NOT EmoCAST. Made by `python -m emocast_lib make-tiny-models` from a fixed "
               "random fill rule so the pack can be run end to end without the real weights. "
               "Their output is noise. Get the real files from the sources in README.md.")


def fill_module(module: nn.Module, seed: int, prefix: str = "") -> nn.Module:
    """Replace every parameter and buffer with the fill rule's tensor for its (prefixed) key."""
    shapes = {prefix + k: v.shape for k, v in module.state_dict().items()}
    filled = fill_state_dict(seed, shapes)
    module.load_state_dict({k[len(prefix):]: v for k, v in filled.items()}, assign=True)
    return module


def filled_net(config: NetConfig = TINY_NET, seed: int = TINY_SEED) -> EmoCASTNet:
    with torch.device("meta"):
        net = EmoCASTNet(config)
    return fill_module(net, seed).eval()


def filled_vae(config: dict[str, Any] = TINY_VAE, seed: int = TINY_SEED):
    from diffusers import AutoencoderKL

    return fill_module(AutoencoderKL(**config), seed).eval()


def filled_text_encoder(config: dict[str, Any] = TINY_CLIP_TEXT, seed: int = TINY_SEED):
    """A transformers CLIPTextModel whose weights are filled under the `text_model.*` key names of
    the checkpoint files (transformers 5 drops that prefix from `state_dict()`, 4.x keeps it)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(**config))
    prefix = "" if next(iter(model.state_dict())).startswith("text_model.") else "text_model."
    return fill_module(model, seed, prefix).eval()


TINY_STEPS = 4  # the denoising steps the tiny net declares (checkpoint.STEPS_KEY): noise needs no more
TINY_MARK = "emocast_tiny_test_model"  # the declaration in every tiny file (metadata, JSON key, zip comment)
README_NAME = "TINY_TEST_MODELS_README.txt"


class TinyModelsError(ValueError):
    """make-tiny-models would replace a file it did not write; the message names the files."""


def planned_files(root: str | Path) -> list[Path]:
    """Every file `make_tiny_models(root)` writes, in order (the tree of `layout.REQUIRED`)."""
    from .. import layout

    root = Path(root)
    return [root / README_NAME, *(f.path(root) for f in (layout.NET, layout.VAE, layout.CLIP_L, layout.WAV2VEC,
                                                         layout.FACE_DETECTOR, layout.FACE_RECOGNIZER,
                                                         layout.LANDMARKER))]


def is_tiny_model(path: str | Path) -> bool:
    """Whether `path` declares itself a tiny test model written by `make_tiny_models` (read without
    running anything from it); False for any other file, unreadable ones included."""
    import json
    import zipfile

    path = Path(path)
    try:
        if path.name == README_NAME:
            return path.read_text().startswith(NOT_A_MODEL)
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                return TINY_MARK in (f.metadata() or {})
        if path.suffix == ".json":
            return TINY_MARK in json.loads(path.read_text())
        if path.suffix == ".onnx":
            import onnx

            return any(p.key == TINY_MARK for p in onnx.load(str(path), load_external_data=False).metadata_props)
        if path.suffix == ".task":
            with zipfile.ZipFile(path) as bundle:
                return bundle.comment == NOT_A_MODEL.encode()
        if path.suffix == ".pth":
            from ..checkpoint import NOTE_KEY, read_metadata

            return read_metadata(path).get(NOTE_KEY) == NOT_A_MODEL
    except Exception:  # unreadable or foreign: not ours, so never replaced
        return False
    return False


def check_tiny_target(root: str | Path, force: bool = False) -> None:
    """Refuse (TinyModelsError, naming the files) when writing the tiny tree into `root` would replace
    or mix with anything that is not a tiny model; `force` allows replacing earlier tiny models only."""
    from .. import layout
    from ..files import output_problem

    root = Path(root)
    existing = [p for p in planned_files(root) if p.exists() or p.is_symlink()]
    faces = layout.face_dir(root)
    planned = set(planned_files(root))
    # Extra detectors next to ours would change which face models InsightFace picks up.
    existing += sorted(p for p in faces.glob("*.onnx") if p not in planned) if faces.is_dir() else []

    def names(paths: list[Path]) -> str:
        return ", ".join(str(p.relative_to(root)) for p in paths)

    if existing and not force:
        raise TinyModelsError(
            f"{root} already holds {len(existing)} of the files make-tiny-models writes: {names(existing)}. "
            "Nothing was written. Choose an empty folder (e.g. models-tiny)"
            + ("; they are all tiny test models, so --force may replace them" if all(map(is_tiny_model, existing))
               else "; files that are not tiny test models are never replaced"))
    foreign = [p for p in existing if not is_tiny_model(p)]
    if foreign:
        raise TinyModelsError(
            f"{root} holds files that are not tiny test models: {names(foreign)}. Nothing was "
            "written, even with --force (it only replaces tiny test models). Choose an empty folder (e.g. models-tiny)")
    problems = [problem for p in planned_files(root) if (problem := output_problem(p, overwrite=True, what="file"))]
    if problems:
        raise TinyModelsError(problems[0])


def make_tiny_models(root: str | Path, seed: int = TINY_SEED, force: bool = False) -> list[Path]:
    """Write a complete ComfyUI-style models tree of tiny fill-rule weights under the file names of
    `layout` (the ones the shipped workflows and the CLI use). Returns the files written.

    Nothing the user has is replaced: `check_tiny_target` runs first, every file declares itself a tiny
    model (`is_tiny_model`) and is written atomically (`files.atomic_path`), so an interrupted run leaves
    whole files only."""
    from safetensors.torch import save_file

    from ..checkpoint import CONFIG_KEY, NOTE_KEY, STEPS_KEY
    from ..files import atomic_path

    check_tiny_target(root, force)
    readme, net, vae, clip, wav2vec, detector, recognizer, task = planned_files(root)
    meta = {TINY_MARK: NOT_A_MODEL}
    writers = [  # the landmarker first: it is the one that may need a download
        (task, _write_marked_landmarker),
        (readme, lambda tmp: tmp.write_text(NOT_A_MODEL + "\n")),
        (net, lambda tmp: torch.save({"state_dict": filled_net(TINY_PACK_NET, seed).state_dict(),
                                      CONFIG_KEY: TINY_PACK_NET.to_json(), NOTE_KEY: NOT_A_MODEL,
                                      STEPS_KEY: str(TINY_STEPS)}, tmp)),
        (vae, lambda tmp: save_file(filled_taesd(seed), tmp, meta)),
        (clip, lambda tmp: save_file(_text_model_keys(filled_text_encoder(CLIP_L_TEXT, seed)), tmp, meta)),
        (wav2vec, lambda tmp: save_file(filled_wav2vec2_base(seed), tmp, meta)),
        (detector, write_centre_face_detector),
        (recognizer, lambda tmp: write_tiny_recognizer(tmp, seed)),
    ]
    for path, write in writers:
        with atomic_path(path, overwrite=force) as tmp:
            write(tmp)
    return [path for path, _ in writers]


def filled_wav2vec2_base(seed: int = TINY_SEED) -> dict[str, torch.Tensor]:
    """A full-width wav2vec2-base (ComfyUI's Load Audio Encoder knows only the 768- and 1024-wide ones) of
    fill-rule weights in fp16, keyed as facebook/wav2vec2-base-960h's model.safetensors (`wav2vec2.` prefix,
    weight_g/weight_v of the positional convolution), without the CTC head EmoCAST does not use."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from ..audio import WAV2VEC2_BASE

    sd = fill_module(Wav2Vec2Model(Wav2Vec2Config(**WAV2VEC2_BASE)), seed).state_dict()
    names = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    public = {}
    for key, value in sd.items():
        for old, new in names.items():
            key = key.replace(old, new)
        public["wav2vec2." + key] = value.half().contiguous()
    return public


def _text_model_keys(model: nn.Module) -> dict[str, torch.Tensor]:
    return {(k if k.startswith("text_model.") else "text_model." + k): v.half() for k, v in model.state_dict().items()}


def filled_taesd(seed: int = TINY_SEED) -> dict[str, torch.Tensor]:
    """A TAESD (tiny SD VAE) in ComfyUI's key layout (`taesd_encoder.*`, `taesd_decoder.*`, `vae_scale`),
    which ComfyUI's Load VAE and the CLI both read; its shapes come from diffusers' AutoencoderTiny,
    whose decoder indices are one lower (ComfyUI's decoder starts with a parameter-free clamp)."""
    import re

    from diffusers import AutoencoderTiny

    from ..config import LATENT_SCALE

    with torch.device("meta"):
        shapes = AutoencoderTiny().state_dict()
    names = {}
    for key, value in shapes.items():
        part, index, rest = re.match(r"(encoder|decoder)\.layers\.(\d+)\.(.*)", key).groups()
        names[f"taesd_{part}.{int(index) + (part == 'decoder')}.{rest}"] = value.shape
    sd = {k: v.half() for k, v in fill_state_dict(seed, names).items()}
    return {**sd, "vae_scale": torch.tensor(LATENT_SCALE), "vae_shift": torch.tensor(0.0)}


def _write_marked_landmarker(path: Path) -> None:
    import zipfile

    write_stand_in_landmarker(path)
    with zipfile.ZipFile(path, "a") as bundle:  # the declaration that lets --force recognise it
        bundle.comment = NOT_A_MODEL.encode()


# --- stand-in face models (the real InsightFace / MediaPipe files cannot be generated) ---------------

def _onnx(graph, path: Path) -> None:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    helper.set_model_props(model, {TINY_MARK: NOT_A_MODEL})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def write_centre_face_detector(path: Path, det_size: int = 640) -> None:
    """SCRFD-shaped ONNX detector (3 strides x score/bbox/kps) that reports one face, centred, about a
    third of the frame wide, whatever the image: enough to drive FaceAnalysis end to end."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outs = [], [], {"score": [], "bbox": [], "kps": []}
    for stride in (8, 16, 32):
        cells = det_size // stride
        score = np.full((cells * cells * 2, 1), -10.0, np.float32)
        if stride == 32:
            score[(cells // 2 * cells + cells // 2) * 2] = 0.95  # first anchor of the centre cell
        dist = np.full((len(score), 4), 3.0, np.float32)  # box = anchor +- 3 strides
        kps = np.tile(np.array([[-1, -1, 1, -1, 0, 0.3, -0.8, 1.2, 0.8, 1.2]], np.float32), (len(score), 1))
        for kind, value in (("score", score), ("bbox", dist), ("kps", kps)):
            name = f"s{stride}_{kind}"
            inits.append(numpy_helper.from_array(value, name + "_c"))
            nodes.append(helper.make_node("Identity", [name + "_c"], [name]))
            outs[kind].append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, det_size, det_size])
    _onnx(helper.make_graph(nodes, "tiny_centre_face_detector", [image],
                            outs["score"] + outs["bbox"] + outs["kps"], inits), path)


def write_tiny_recognizer(path: Path, seed: int = TINY_SEED) -> None:
    """ArcFace-shaped ONNX recognizer: 112x112 face crop -> 512-d embedding (pooled pixels x fixed matrix)."""
    from onnx import TensorProto, helper, numpy_helper

    weight = fill_state_dict(seed, {"recognizer.weight": (3 * 8 * 8, 512)})["recognizer.weight"].numpy()
    nodes = [helper.make_node("AveragePool", ["input.1"], ["pool"], kernel_shape=[14, 14], strides=[14, 14]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("MatMul", ["flat", "W"], ["embedding"])]
    _onnx(helper.make_graph(nodes, "tiny_recognizer",
                            [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 112, 112])],
                            [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 512])],
                            [numpy_helper.from_array(weight, "W")]), path)


# MediaPipe 0.10.21's face detector and 468-point face mesh models (Apache-2.0, see mediapipe_legacy/NOTICE),
# under the member names a FaceLandmarker `.task` bundle gives them.
LEGACY_MEDIAPIPE = Path(__file__).resolve().parent / "mediapipe_legacy"
_BUNDLE_MEMBERS = {"face_detector.tflite": "face_detection_short_range.tflite",
                   "face_landmarks_detector.tflite": "face_landmark.tflite"}


def write_stand_in_landmarker(task: Path) -> None:
    """Write a FaceLandmarker `.task` bundle assembled from the two MediaPipe 0.10.21 models shipped in
    `mediapipe_legacy/` (no download).

    What it proves: the bundle loads and runs through MediaPipe's real Tasks API (`LandmarkDetector`), its
    detector finds a real face, and the 478 points it returns are centred on that face. What it does not:
    the points are not usable landmarks (a median 64 px off the fixture's FaceMesh landmarks on the 92-px
    astronaut face) and NOT those of the released `face_landmarker_v2_with_blendshapes.task`, so mask parity
    is checked on the fixture landmarks, never on these."""
    import zipfile

    task.parent.mkdir(parents=True, exist_ok=True)
    part = task.with_name(task.name + ".part")  # an interrupted run leaves no half bundle under the real name
    with zipfile.ZipFile(part, "w", zipfile.ZIP_STORED) as bundle:
        for member, name in _BUNDLE_MEMBERS.items():
            bundle.write(LEGACY_MEDIAPIPE / name, member)
    os.replace(part, task)

