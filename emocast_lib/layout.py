"""Where every model file lives in a ComfyUI-style `models/` tree, and where users get it.

One table serves the CLI (`--models DIR`), `make-tiny-models` and the ComfyUI nodes, so the three
always agree on file names.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelFile:
    folder: str  # ComfyUI model folder name (models/<folder>)
    name: str  # path inside that folder
    source: str  # where to download it
    what: str

    def path(self, models_dir: str | Path) -> Path:
        return Path(models_dir) / self.folder / self.name


NET = ModelFile("emocast", "net.pth", "https://huggingface.co/Jmaomao/EmoCAST (net.pth)",
                "EmoCAST network (both UNets, face locator, image and audio projections)")
WAV2VEC = ModelFile("emocast", "wav2vec/wav2vec2-base-960h",
                    "https://huggingface.co/facebook/wav2vec2-base-960h (config.json, model.safetensors, "
                    "preprocessor_config.json)", "wav2vec2-base-960h audio encoder folder")
_HALLO = "https://huggingface.co/fudan-generative-ai/hallo/tree/main/pretrained_models/face_analysis/models"
FACE_ANALYSIS = ModelFile("emocast", "face_analysis/models",
                          f"{_HALLO} (the InsightFace .onnx files: detection + recognition)",
                          "InsightFace model folder (face detection and identity embedding)")
LANDMARKER = ModelFile("emocast", "face_analysis/models/face_landmarker_v2_with_blendshapes.task", _HALLO,
                       "MediaPipe face landmarker")
SEPARATOR = ModelFile("emocast", "audio_separator/Kim_Vocal_2.onnx",
                      "https://github.com/TRvlvr/model_repo/releases/download/all_public_uvr_models/Kim_Vocal_2.onnx",
                      "vocal separation model (optional)")
VAE = ModelFile("vae", "vae-ft-mse-840000-ema-pruned.safetensors",
                "https://huggingface.co/stabilityai/sd-vae-ft-mse-original", "Stable Diffusion VAE (sd-vae-ft-mse)")
CLIP_L = ModelFile("text_encoders", "clip_l.safetensors",
                   "https://huggingface.co/comfyanonymous/flux_text_encoders (clip_l.safetensors)",
                   "CLIP ViT-L/14 text encoder")

REQUIRED = (NET, WAV2VEC, FACE_ANALYSIS, LANDMARKER, VAE, CLIP_L)


def missing_files(models_dir: str | Path, files=REQUIRED) -> list[ModelFile]:
    return [f for f in files if not f.path(models_dir).exists()]


def missing_report(models_dir: str | Path, missing: list[ModelFile]) -> str:
    lines = [f"{len(missing)} model file(s) missing under {Path(models_dir).resolve()}:"]
    for f in missing:
        lines.append(f"  - {f.what}\n      put it at: {f.path(models_dir)}\n      download:  {f.source}")
    lines.append("To try the pipeline without real weights: python -m emocast_lib make-tiny-models DIR "
                 "(tiny test models, their output is noise).")
    return "\n".join(lines)
