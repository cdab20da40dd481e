"""Node glue that needs no ComfyUI: ComfyUI-format tensors in and out of the library's types."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from emocast_lib.emotion import emotion_schedule
from packimport import pack_module

ROOT = Path(__file__).resolve().parents[1]


convert = pack_module("convert")
types = pack_module("types")


def test_single_image_takes_one_portrait_and_drops_alpha():
    image = torch.rand(1, 40, 30, 4)
    out = convert.single_image(image, "portrait")
    assert out.shape == (40, 30, 3) and torch.equal(out, image[0, :, :, :3])
    with pytest.raises(types.EmoCASTInputError, match="portrait: got a batch of 2 images"):
        convert.single_image(torch.rand(2, 8, 8, 3), "portrait")
    with pytest.raises(types.EmoCASTInputError, match=r"image: expected a ComfyUI IMAGE"):
        convert.single_image(torch.rand(8, 8, 3), "image")


def test_to_uint8_rounds_like_pil():
    image = torch.tensor([[[0.0, 0.5, 1.0], [0.2, 1.3, -0.1]]])
    assert convert.to_uint8(image).tolist() == [[[0, 128, 255], [51, 255, 0]]]


def test_mask_from_u8_is_a_comfy_mask():
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    out = convert.mask_from_u8(mask, 128, 96)
    assert out.shape == (1, 128, 96) and out.dtype == torch.float32
    assert out.min() == 0 and out.max() == 1
    assert out[0, 64, 48] == 1 and out[0, 0, 0] == 0
    same = convert.mask_from_u8(mask, 64, 64)
    assert torch.equal(same[0], torch.from_numpy(mask).float() / 255)


def test_audio_mono_checks_comfy_audio():
    wave = torch.randn(1, 2, 800)
    out, rate = convert.audio_mono({"waveform": wave, "sample_rate": 44100})
    assert rate == 44100 and torch.equal(out, wave[0])
    with pytest.raises(types.EmoCASTInputError, match="audio is empty"):
        convert.audio_mono({"waveform": torch.zeros(1, 1, 0), "sample_rate": 16000})
    with pytest.raises(types.EmoCASTInputError, match="batch of 3"):
        convert.audio_mono({"waveform": torch.zeros(3, 1, 10), "sample_rate": 16000})
    with pytest.raises(types.EmoCASTInputError, match="not a ComfyUI AUDIO"):
        convert.audio_mono({"waveform": torch.zeros(10), "sample_rate": 16000})


@pytest.mark.parametrize("samples,rate,frames,fps", [(44100 * 3 + 7, 44100, 76, 25), (1000, 16000, 2, 25),
                                                     (48000, 48000, 24, 24)])
def test_fit_audio_lasts_exactly_the_video(samples, rate, frames, fps):
    wave = torch.randn(1, 2, samples)
    out = convert.fit_audio({"waveform": wave, "sample_rate": rate}, frames, fps)
    n = math.ceil(frames * rate / fps)
    assert out["sample_rate"] == rate and out["waveform"].shape == (1, 2, n)
    keep = min(n, samples)
    assert torch.equal(out["waveform"][..., :keep], wave[..., :keep])
    assert not out["waveform"][..., keep:].any()


class RecordingComfyVAE:
    """FAKE stand-in for comfy.sd.VAE's calling convention only ([B, H, W, C] 0..1 pixels in, latents out;
    latents in, [B, H, W, C] pixels out); the real object is exercised by tests/test_comfy_*.py."""

    def __init__(self):
        self.seen = []

    def encode(self, pixels):
        self.seen.append(pixels)
        return pixels.movedim(-1, 1)[:, :1, ::8, ::8].expand(-1, 4, -1, -1)

    def decode(self, latents):
        return latents[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2).movedim(1, -1)


def test_comfy_vae_adapter_converts_layout_and_range():
    fake = RecordingComfyVAE()
    vae = convert.comfy_vae(fake)
    pixels = torch.rand(2, 3, 16, 24) * 2 - 1
    latents = vae.encode(pixels)
    assert fake.seen[0].shape == (2, 16, 24, 3)
    assert torch.allclose(fake.seen[0], ((pixels + 1) / 2).movedim(1, -1))
    assert latents.shape == (2, 4, 2, 3)
    assert vae.decode(latents).shape == (2, 3, 16, 24)


def test_latents_to_comfy_undo_the_model_scale():
    latents = torch.randn(1, 4, 5, 8, 8)
    samples = convert.latents_to_comfy(latents)["samples"]
    assert samples.shape == (5, 4, 8, 8)
    assert torch.allclose(samples[3] * 0.18215, latents[0, :, 3])
    frames = torch.rand(5, 3, 64, 64)
    assert torch.equal(convert.frames_to_image(frames)[2], frames[2].permute(1, 2, 0))


def test_emotion_cond_resolves_per_frame():
    a, b = torch.randn(77, 8), torch.randn(77, 8)
    single = types.EmotionCond([(a, 0.0, math.inf)], torch.zeros(1, 77, 8), ["calm"])
    assert single.width == 8 and torch.equal(single.per_frame(25, 100), a[None])
    sched = types.EmotionCond([(a, 0.0, 1.0), (b, 1.2, 3.0)], torch.zeros(1, 77, 8), ["calm", "scared"], 0.4)
    frames = sched.per_frame(25, 80)
    assert torch.equal(frames, emotion_schedule(sched.segments, 0.4, 25, 80))
    assert torch.allclose(frames[0], a) and torch.allclose(frames[-1], b)
    assert '0-1 s: "calm"' in sched.describe() and "crossfade 0.4 s" in sched.describe()
