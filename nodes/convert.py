"""ComfyUI types <-> library types. No ComfyUI import: these are tested on plain tensors (ComfyUI's CLIP
and VAE objects are duck-typed)."""
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


class ComfyTextEncoder:
    """`emocast_lib.emotion.TextEncoder` over ComfyUI's CLIP object (SD1.5 CLIP-L). Prompt weighting syntax
    is disabled (the text is taken literally, as the reference), and the padding mask is switched on only
    while encoding because the module is shared by every clone of the CLIP object. ComfyUI keeps
    text-encoder weights in fp16 on CPU by default (max deviation ~3e-3); load them in fp32 for exact
    parity."""

    def __init__(self, clip):
        self.clip = clip

    def _chunks(self, prompt: str) -> list[list[int]]:
        tokens = self.clip.tokenize(prompt, disable_weights=True)
        if set(tokens) != {"l"}:
            raise ValueError(f"EmoCAST needs an SD1.5 CLIP-L text encoder (CLIPLoader type 'stable_diffusion'); "
                             f"this CLIP produces {sorted(tokens)} tokens")
        return [[int(t[0]) for t in chunk] for chunk in tokens["l"]]

    def tokenize(self, prompt: str) -> list[int]:
        # ComfyUI splits long prompts into 77-token windows of [start, text..., end, end padding]
        chunks = self._chunks(prompt)
        start, end = chunks[0][0], chunks[0][-1]
        text = [t for chunk in chunks for t in chunk[1:] if t != end]
        return [start, *text, end]

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # ComfyUI derives the same mask from the ids (1 up to the first end token); keep ours for checks.
        tokens = {"l": [[(int(t), 1.0) for t in input_ids[0]]]}
        clip_l = self.clip.cond_stage_model.clip_l
        previous = clip_l.enable_attention_masks
        clip_l.enable_attention_masks = True
        try:
            return self.clip.encode_from_tokens(tokens).cpu()
        finally:
            clip_l.enable_attention_masks = previous
