"""Emotion prompt adapters and the per-frame emotion schedule.

ComfyUI cannot be imported here, so `FakeComfyCLIP` stands in for `comfy.sd.CLIP` with the behaviour
recorded in comfyui_api.md §2.2: `tokenize(text, disable_weights=True)` -> {"l": [77-token chunks of
(id, weight)]}, prompts over 75 tokens split into several chunks, and `encode_from_tokens` that honours
`cond_stage_model.clip_l.enable_attention_masks` (pads masked only when it is set). Its text model is a
real transformers CLIPTextModel, so its output can be compared with `HFTextEncoder` on the same model.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from emocast_lib.emotion import HFTextEncoder, emotion_embeddings, emotion_schedule, encode_prompt
from packimport import pack_module

ComfyTextEncoder = pack_module("convert").ComfyTextEncoder

START, END = 49406, 49407


class WordTokenizer:
    """FAKE tokenizer: one id per whitespace-separated word (enough to test lengths and padding)."""

    def __call__(self, prompt: str, truncation: bool = False) -> dict:
        return {"input_ids": [START] + [100 + len(w) for w in prompt.split()] + [END]}


class FakeComfyCLIP:
    def __init__(self, text_model):
        self.text_model = text_model
        self.cond_stage_model = SimpleNamespace(clip_l=SimpleNamespace(enable_attention_masks=False))
        self.seen_flags: list[bool] = []

    def tokenize(self, text: str, disable_weights: bool = False) -> dict:
        assert disable_weights, "prompt weighting must be off"
        words = WordTokenizer()(text)["input_ids"][1:-1]
        chunks = [words[i:i + 75] for i in range(0, max(len(words), 1), 75)] or [[]]
        return {"l": [[(t, 1.0) for t in [START, *c, END] + [END] * (75 - len(c))] for c in chunks]}

    def encode_from_tokens(self, tokens: dict) -> torch.Tensor:
        flag = self.cond_stage_model.clip_l.enable_attention_masks
        self.seen_flags.append(flag)
        ids = torch.tensor([[t for t, _ in tokens["l"][0]]])
        first_end = int((ids[0] == END).nonzero()[0])
        mask = (torch.arange(77) <= first_end).long()[None] if flag else None
        with torch.inference_mode():
            return self.text_model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.fixture(scope="module")
def text_model():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu")
    return CLIPTextModel(config).eval()


def test_comfy_adapter_equals_hf_with_mask(text_model):
    hf = HFTextEncoder(WordTokenizer(), text_model)
    clip = FakeComfyCLIP(text_model)
    comfy = ComfyTextEncoder(clip)
    for prompt in ("the portrait looks very angry", ""):
        ours, theirs = encode_prompt(comfy, prompt), encode_prompt(hf, prompt)
        torch.testing.assert_close(ours.input_ids, theirs.input_ids, rtol=0, atol=0)
        torch.testing.assert_close(ours.hidden, theirs.hidden, rtol=0, atol=1e-6)
    assert clip.seen_flags == [True, True] and clip.cond_stage_model.clip_l.enable_attention_masks is False


def test_comfy_flag_restored_on_error(text_model):
    clip = FakeComfyCLIP(text_model)
    clip.cond_stage_model.clip_l.enable_attention_masks = "previous"

    def boom(tokens):
        raise RuntimeError("encode failed")

    clip.encode_from_tokens = boom
    with pytest.raises(RuntimeError, match="encode failed"):
        encode_prompt(ComfyTextEncoder(clip), "happy")
    assert clip.cond_stage_model.clip_l.enable_attention_masks == "previous"


def test_comfy_long_prompt_is_rejected_not_chunked(text_model):
    comfy = ComfyTextEncoder(FakeComfyCLIP(text_model))
    prompt = " ".join(["calm"] * 80)
    assert len(comfy.tokenize(prompt)) == 82  # both ComfyUI chunks re-joined
    with pytest.raises(ValueError, match="80 tokens; CLIP takes at most 75: shorten it by 5"):
        encode_prompt(comfy, prompt)
    out = encode_prompt(comfy, prompt, truncate=True)
    assert out.dropped == " ".join(["calm"] * 5) and out.input_ids.shape == (1, 77) and out.hidden.shape == (1, 77, 32)


def test_comfy_rejects_non_sd15_clip(text_model):
    clip = FakeComfyCLIP(text_model)
    clip.tokenize = lambda text, disable_weights=False: {"g": [], "l": []}
    with pytest.raises(ValueError, match="SD1.5 CLIP-L"):
        encode_prompt(ComfyTextEncoder(clip), "sad")


def test_uncond_is_the_empty_prompt(text_model):
    cond, uncond = emotion_embeddings(HFTextEncoder(WordTokenizer(), text_model), "joy")
    assert uncond.prompt == "" and uncond.input_ids[0, :3].tolist() == [START, END, END]
    assert uncond.attention_mask.sum() == 2 and cond.attention_mask.sum() == 3


# --- schedule -------------------------------------------------------------------------------------

def _emb(value: float) -> torch.Tensor:
    return torch.full((77, 4), value)


def test_schedule_hard_switch_and_gap():
    frames = emotion_schedule([(_emb(0), 0.0, 1.0), (_emb(1), 1.0, 2.0)], crossfade_s=0, fps=4, num_frames=10)
    assert frames.shape == (10, 77, 4)
    assert frames[:, 0, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    # gap 1.0 .. 2.0 s: boundary in the middle (1.5 s = frame 6)
    frames = emotion_schedule([(_emb(1), 2.0, 3.0), (_emb(0), 0.0, 1.0)], crossfade_s=0, fps=4, num_frames=14)
    assert frames[:, 0, 0].tolist() == [0] * 6 + [1] * 8


def test_schedule_linear_crossfade():
    frames = emotion_schedule([(_emb(0), 0.0, 1.0), (_emb(2), 1.0, 2.0)], crossfade_s=0.5, fps=8, num_frames=16)
    # boundary 1.0 s, fade from 0.75 s (frame 6) to 1.25 s (frame 10): weights 0, .25, .5, .75, 1
    torch.testing.assert_close(frames[4:12, 0, 0], torch.tensor([0, 0, 0, 0.5, 1, 1.5, 2, 2]))
    assert torch.equal(frames[7], torch.full((77, 4), 0.5))


def test_schedule_single_segment_and_errors():
    assert torch.equal(emotion_schedule([(_emb(3), 0.5, 1.0)], 0.2, 25, 5), torch.full((5, 77, 4), 3.0))
    with pytest.raises(ValueError, match="at least one"):
        emotion_schedule([], 0, 25, 5)
    with pytest.raises(ValueError, match="overlap"):
        emotion_schedule([(_emb(0), 0.0, 1.5), (_emb(1), 1.0, 2.0)], 0, 25, 5)
    with pytest.raises(ValueError, match="before it starts"):
        emotion_schedule([(_emb(0), 1.0, 1.0)], 0, 25, 5)
    with pytest.raises(ValueError, match="one shape"):
        emotion_schedule([(_emb(0), 0.0, 1.0), (torch.zeros(77, 8), 1.0, 2.0)], 0, 25, 5)
    with pytest.raises(ValueError, match="fps > 0"):
        emotion_schedule([(_emb(0), 0.0, 1.0)], 0, 0, 5)
