"""ComfyUI types <-> library types. No ComfyUI import: these are tested on plain tensors."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from emocast_lib.pipeline import Vae

from .types import EmoCASTInputError

LATENT_SCALE = 0.18215  # EmoCAST's latents are VAE latents x this; ComfyUI's LATENT is the unscaled one


def single_image(image: torch.Tensor, name: str) -> torch.Tensor:
    """IMAGE [B, H, W, C] -> (H, W, 3) float 0..1; a batch of more than one portrait is refused."""
    if image.ndim != 4 or image.shape[-1] not in (3, 4):
        raise EmoCASTInputError(f"{name}: expected a ComfyUI IMAGE [batch, height, width, 3], got shape "
                                f"{tuple(image.shape)}")
    if image.shape[0] != 1:
        raise EmoCASTInputError(f"{name}: got a batch of {image.shape[0]} images; connect one portrait "
                                "(pick one with the core 'Image From Batch' node)")
    return image[0, :, :, :3]


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(H, W, 3) float 0..1 -> RGB uint8, rounded as PIL's ToTensor inverse."""
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def mask_from_u8(mask: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 (h, w) mask 0..255 -> ComfyUI MASK [1, height, width] 0..1 (bilinear)."""
    m = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None] / 255
    if m.shape[-2:] != (height, width):
        m = F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False)
    return m[0].clamp(0, 1)


def audio_mono(audio: dict, name: str = "audio") -> tuple[torch.Tensor, int]:
    """AUDIO {"waveform": [B, C, N], "sample_rate"} -> ([C, N] float32, rate); one clip only."""
    wave, rate = audio.get("waveform"), audio.get("sample_rate")
    if not isinstance(wave, torch.Tensor) or wave.ndim != 3:
        raise EmoCASTInputError(f"{name}: not a ComfyUI AUDIO (waveform [batch, channels, samples])")
    if wave.shape[0] != 1:
        raise EmoCASTInputError(f"{name}: got a batch of {wave.shape[0]} sounds; connect one speech track")
    if wave.shape[-1] == 0:
        raise EmoCASTInputError(f"{name}: the audio is empty (0 samples); load a speech file with Load Audio")
    return wave[0].float(), int(rate)


def fit_audio(audio: dict, frames: int, fps: int) -> dict:
    """AUDIO trimmed or zero-padded to exactly `frames / fps` seconds, rate and channels kept."""
    wave, rate = audio["waveform"], int(audio["sample_rate"])
    n = math.ceil(frames * rate / fps)
    out = wave[..., :n]
    if out.shape[-1] < n:
        out = F.pad(out, (0, n - out.shape[-1]))
    return {"waveform": out.contiguous(), "sample_rate": rate}


def comfy_vae(vae) -> Vae:
    """Library VAE adapter over ComfyUI's VAE object, which takes and returns [B, H, W, C] 0..1 pixels
    and encodes to the unscaled posterior mean."""
    def encode(pixels: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) in [-1, 1]
        return vae.encode(((pixels.float() + 1) / 2).movedim(1, -1))

    def decode(latents: torch.Tensor) -> torch.Tensor:  # unscaled (N, 4, h, w)
        return vae.decode(latents).movedim(-1, 1)

    return Vae(encode, decode)


def frames_to_image(frames: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) 0..1 -> IMAGE [n, H, W, 3]."""
    return frames.movedim(1, -1).contiguous().float()


def latents_to_comfy(latents: torch.Tensor) -> dict:
    """(1, 4, n, h, w) in EmoCAST's scale -> LATENT with frames in the batch, ComfyUI's (unscaled) scale,
    so core VAE Decode turns it into the same frames."""
    return {"samples": (latents[0].transpose(0, 1) / LATENT_SCALE).contiguous().float()}
