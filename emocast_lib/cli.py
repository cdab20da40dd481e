"""`python -m emocast_lib generate`: files in, mp4 out, through the same library path as the nodes."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from . import layout
from .config import SamplingConfig


class ClipBpeTokenizer:
    """CLIP's BPE tokenizer from the `instant-clip-tokenizer` wheel, which carries the vocabulary, so
    the CLI needs no tokenizer download. Called like a transformers tokenizer by `HFTextEncoder`."""

    def __init__(self):
        from instant_clip_tokenizer import Tokenizer

        self.bpe = Tokenizer()

    def __call__(self, prompt: str, truncation: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [self.bpe.start_of_text(), *self.bpe.encode(prompt), self.bpe.end_of_text()]}


def load_clip_l(path: Path, device: torch.device):
    """CLIP-L text encoder from a single ComfyUI-style file (`text_model.*` keys)."""
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from .emotion import HFTextEncoder
    from .config import CLIP_L_TEXT

    sd = {k.removeprefix("text_model."): v.float() for k, v in load_file(path).items() if k.startswith("text_model.")}
    model = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
    inner = getattr(model, "text_model", model)  # transformers 5 flattened the text model
    missing, unexpected = inner.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or not sd:
        raise ValueError(f"{path} is not a CLIP-L text encoder ({len(missing)} missing keys, e.g. {missing[:3]}): "
                         f"put clip_l.safetensors there ({layout.CLIP_L.source})")
    return HFTextEncoder(ClipBpeTokenizer(), model.to(device))


def load_vae(path: Path, device: torch.device, dtype: torch.dtype):
    """sd-vae-ft-mse from one file in either the original (LDM) or the diffusers key layout."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    from .config import SD_VAE

    sd = load_file(path)
    if "encoder.down.0.block.0.conv1.weight" in sd:
        sd = convert_ldm_vae_checkpoint(sd, SD_VAE)
    vae = AutoencoderKL(**SD_VAE)
    try:
        vae.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} is not an SD VAE (sd-vae-ft-mse): {str(e)[:300]}") from e
    return vae.to(device, dtype).eval()


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def generate_file(args: argparse.Namespace) -> Path:
    from PIL import Image

    from . import audio as audio_lib, face as face_lib
    from .checkpoint import load_net
    from .emotion import emotion_embeddings
    from .pipeline import AudioWindows, Emotion, iter_clips, make_portrait, diffusers_vae
    from .video import Mp4Writer

    needed = [f for f in layout.REQUIRED if not (args.no_identity and f in layout.IDENTITY)]
    missing = layout.missing_files(args.models, needed)
    inputs = [p for p in (args.image, args.audio) if not p.is_file()]
    if missing or inputs:
        lines = [f"input file not found: {p}" for p in inputs]
        raise FileNotFoundError("\n".join(lines + ([layout.missing_report(args.models, missing)] if missing else [])))
    # Audio first: it is cheap to decode and check, so bad audio fails before any model loads.
    wave, rate = audio_lib.load_audio_file(args.audio)
    if args.vocal_separation:
        vocals = audio_lib.separate_vocals(args.audio, layout.SEPARATOR.path(args.models).parent,
                                           args.out.parent / ".emocast_separated")
        wave16k = audio_lib.load_separated_16k(vocals)
    else:
        wave16k = audio_lib.to_16k_mono(wave, rate)
    if len(wave16k) < audio_lib.SAMPLE_RATE / args.fps:
        raise ValueError(f"{args.audio} is shorter than one video frame at {args.fps} fps")
    device = pick_device(args.device)
    dtype = pick_dtype(args.precision, device)

    net = load_net(layout.NET.path(args.models), dtype=dtype, device=device)
    size = net.config.sample_size
    rgb = np.asarray(Image.open(args.image).convert("RGB"))
    with face_lib.LandmarkDetector(layout.LANDMARKER.path(args.models)) as detect:
        landmarks = detect(rgb)
    if args.no_identity:
        identity = np.zeros(net.config.image_proj.embedding_dim, np.float32)
    else:
        found = face_lib.face_identity(face_lib.load_face_analysis(layout.face_dir(args.models)), rgb)
        print(found.note)
        identity = found.embedding
    portrait = make_portrait(rgb, landmarks, identity, size, args.expand_ratio)

    feats = audio_lib.encode_audio(wave16k, audio_lib.load_wav2vec2(layout.WAV2VEC.path(args.models)).to(device),
                                   args.fps, args.clip_length)

    cond, uncond = emotion_embeddings(load_clip_l(layout.CLIP_L.path(args.models), device), args.emotion)
    vae = diffusers_vae(load_vae(layout.VAE.path(args.models), device, dtype))
    settings = SamplingConfig(steps=args.steps, cfg_scale=args.cfg, frames_per_clip=args.clip_length, fps=args.fps,
                              motion_scale=(args.pose_weight, args.face_weight, args.lip_weight), seed=args.seed)
    writer = Mp4Writer(args.out, args.fps, wave16k, audio_lib.SAMPLE_RATE)
    clips = feats.num_clips
    try:
        for clip in iter_clips(net, vae, portrait, AudioWindows(feats.windowed, feats.audio_length),
                               Emotion(cond.hidden, uncond.hidden), settings,
                               on_step=lambda c, i, _: print(f"\rclip {c + 1}/{clips} step {i + 1}/{args.steps}",
                                                             end="", flush=True)):
            writer.write(clip.frames)
    except BaseException:
        writer.abort()
        raise
    print()
    return writer.close()
