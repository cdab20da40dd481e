"""Where every model file lives in a ComfyUI-style `models/` tree, and the URL that serves exactly it.

One table serves the CLI (`--models DIR`), `make-tiny-models`, the ComfyUI nodes, the templates'
`models` metadata (what ComfyUI's missing-models dialog offers to download, checked by
tests/test_templates.py) and the README's model table, so they always agree on file names.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelFile:
    folder: str  # ComfyUI model folder name (models/<folder>)
    name: str  # path inside that folder
    source: str  # URL that serves exactly this file
    what: str

    def path(self, models_dir: str | Path) -> Path:
        return Path(models_dir) / self.folder / self.name

    def metadata(self) -> dict[str, str]:
        """This file as an entry of a workflow's `models` list (ComfyUI frontend format)."""
        return {"name": self.name, "url": self.source, "directory": self.folder}


_HF = "https://huggingface.co"
# Hallo's release (the layout EmoCAST's README asks for) serves the face models one file at a time.
_HALLO_FACE = f"{_HF}/fudan-generative-ai/hallo/resolve/main/face_analysis/models"
FACE_DIR = "face_analysis/models"  # inside models/emocast: the InsightFace files and the landmarker

NET = ModelFile("emocast", "net.pth", f"{_HF}/Jmaomao/EmoCAST/resolve/main/net.pth",
                "EmoCAST network (both UNets, face locator, image and audio projections)")
WAV2VEC = ModelFile("audio_encoders", "wav2vec2-base-960h.safetensors",
                    f"{_HF}/facebook/wav2vec2-base-960h/resolve/main/model.safetensors",
                    "wav2vec2-base-960h speech encoder (facebook's model.safetensors, saved under this name)")
FACE_DETECTOR = ModelFile("emocast", f"{FACE_DIR}/scrfd_10g_bnkps.onnx", f"{_HALLO_FACE}/scrfd_10g_bnkps.onnx",
                          "InsightFace face detector (SCRFD, antelopev2)")
FACE_RECOGNIZER = ModelFile("emocast", f"{FACE_DIR}/glintr100.onnx", f"{_HALLO_FACE}/glintr100.onnx",
                            "InsightFace identity embedding (ArcFace glintr100, antelopev2)")
LANDMARKER = ModelFile("emocast", f"{FACE_DIR}/face_landmarker_v2_with_blendshapes.task",
                       f"{_HALLO_FACE}/face_landmarker_v2_with_blendshapes.task", "MediaPipe face landmarker")
VAE = ModelFile("vae", "vae-ft-mse-840000-ema-pruned.safetensors",
                f"{_HF}/stabilityai/sd-vae-ft-mse-original/resolve/main/vae-ft-mse-840000-ema-pruned.safetensors",
                "Stable Diffusion VAE (sd-vae-ft-mse)")
CLIP_L = ModelFile("text_encoders", "clip_l.safetensors",
                   f"{_HF}/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors",
                   "CLIP ViT-L/14 text encoder")
SEPARATOR = ModelFile("emocast", "audio_separator/Kim_Vocal_2.onnx",
                      "https://github.com/TRvlvr/model_repo/releases/download/all_public_uvr_models/Kim_Vocal_2.onnx",
                      "vocal separation model (optional)")

IDENTITY = (FACE_DETECTOR, FACE_RECOGNIZER)  # only needed with face identity on
# Every file a shipped template needs, in the order of the README's table.
REQUIRED = (NET, WAV2VEC, FACE_DETECTOR, FACE_RECOGNIZER, LANDMARKER, VAE, CLIP_L)


def face_dir(models_dir: str | Path) -> Path:
    """The folder InsightFace reads (every .onnx in it) and that holds the landmarker."""
    return LANDMARKER.path(models_dir).parent


def missing_files(models_dir: str | Path, files=REQUIRED) -> list[ModelFile]:
    return [f for f in files if not f.path(models_dir).exists()]


def missing_report(models_dir: str | Path, missing: list[ModelFile]) -> str:
    lines = [f"{len(missing)} model file(s) missing under {Path(models_dir).resolve()}:"]
    for f in missing:
        lines.append(f"  - {f.what}\n      put it at: {f.path(models_dir)}\n      download:  {f.source}")
    lines.append("To try the pipeline without real weights: python -m emocast_lib make-tiny-models DIR "
                 "(tiny test models, their output is noise).")
    return "\n".join(lines)
