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

from .config import CLIP_L_TEXT, SD_VAE, AudioProjConfig, FaceLocatorConfig, ImageProjConfig, NetConfig, UNetConfig
from .fill import fill_state_dict
from .models import EmoCASTNet

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
# 512-d identity of InsightFace and 12 wav2vec layers, so that ComfyUI's own CLIP-L and SD-VAE
# loaders take the companion files. Its native size is 64 px to keep CPU runs short.
TINY_PACK_NET = replace(
    TINY_NET, unet=replace(TINY_NET.unet, cross_attention_dim=768, audio_attention_dim=768),
    image_proj=ImageProjConfig(embedding_dim=512, tokens=4, width=768),
    audio_proj=replace(TINY_NET.audio_proj, layers=12, channels=32), sample_size=64)
TINY_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 8,
    "block_out_channels": [16, 16, 32, 32], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "act_fn": "silu", "sample_size": 128, "scaling_factor": 0.18215,
}
TINY_CLIP_TEXT: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 48, "intermediate_size": 96, "projection_dim": 48, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05,
    "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
}

TINY_WAV2VEC: dict[str, Any] = {
    "hidden_size": 32, "conv_dim": [32] * 7, "conv_kernel": [10, 3, 3, 3, 3, 2, 2], "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "conv_bias": False, "feat_extract_norm": "group", "do_stable_layer_norm": False, "num_hidden_layers": 12,
    "num_attention_heads": 4, "intermediate_size": 64, "num_conv_pos_embeddings": 128,
    "num_conv_pos_embedding_groups": 16, "vocab_size": 32,
}
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


def make_tiny_models(root: str | Path, seed: int = TINY_SEED) -> list[Path]:
    """Write a complete ComfyUI-style models tree of tiny fill-rule weights under the file names of
    `layout` (the ones the shipped workflows and the CLI use). Returns the files written."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from . import layout
    from .checkpoint import CONFIG_KEY, NOTE_KEY

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "TINY_TEST_MODELS_README.txt").write_text(NOT_A_MODEL + "\n")
    meta = {"emocast_tiny_test_model": NOT_A_MODEL}

    net = layout.NET.path(root)
    net.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": filled_net(TINY_PACK_NET, seed).state_dict(), CONFIG_KEY: TINY_PACK_NET.to_json(),
                NOTE_KEY: NOT_A_MODEL}, net)

    vae = layout.VAE.path(root)
    vae.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half() for k, v in fill_module(AutoencoderKL(**SD_VAE), seed).state_dict().items()}, vae, meta)

    clip = layout.CLIP_L.path(root)
    clip.parent.mkdir(parents=True, exist_ok=True)
    sd = filled_text_encoder(CLIP_L_TEXT, seed).state_dict()
    save_file({(k if k.startswith("text_model.") else "text_model." + k): v.half() for k, v in sd.items()}, clip, meta)

    w2v = layout.WAV2VEC.path(root)
    fill_module(Wav2Vec2Model(Wav2Vec2Config(**TINY_WAV2VEC)), seed).save_pretrained(w2v)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False).save_pretrained(w2v)

    faces = write_tiny_face_models(layout.FACE_ANALYSIS.path(root), layout.LANDMARKER.path(root))
    return [net, vae, clip, w2v, *faces]


# --- stand-in face models (the real InsightFace / MediaPipe files cannot be generated) ---------------

def _onnx(graph, path: Path) -> None:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
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


def write_tiny_face_models(face_dir: Path, task: Path) -> list[Path]:
    face_dir.mkdir(parents=True, exist_ok=True)
    detector, recognizer = face_dir / "tiny_scrfd.onnx", face_dir / "tiny_arcface.onnx"
    write_centre_face_detector(detector)
    write_tiny_recognizer(recognizer)
    write_stand_in_landmarker(task)
    return [detector, recognizer, task]
