"""Emotion text tokens vs the parity fixture `text_encoder.safetensors` (fixtures/parity/README.md §5.3).

The tiny CLIP text model is a real transformers `CLIPTextModel` built from `tiny_config.json` and filled
with the fill rule (the set's weight seed). The real CLIP BPE vocabulary is not shipped with transformers; the
tokenizer tests build vocab.json/merges.txt from OpenAI's BPE merges file (`bpe_simple_vocab_16e6.txt`), which
the installed `instant-clip-tokenizer` (a runtime dependency) carries verbatim inside its extension module.
The fixture's token ids come from that vocabulary; nothing is downloaded.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from emocast_lib.bench.fill import fill_tensor, tensor_sha256
from emocast_lib.emotion import HFTextEncoder, emotion_embeddings, encode_prompt, load_clip_tokenizer, pad_ids


@pytest.fixture(scope="module")
def text_model(parity_dir: Path, parity_config: dict):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = parity_config["text_encoder_clip_text_config"]
    model = CLIPTextModel(CLIPTextConfig(**config)).eval()
    own = model.state_dict()
    with open(parity_dir / "tiny_aux_manifest.tsv") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if r["module"] == "text_encoder"]
    filled = {}
    for row in rows:
        # transformers 5 drops the `text_model.` prefix from CLIPTextModel's state dict
        key = row["key"] if row["key"] in own else row["key"].removeprefix("text_model.")
        shape = tuple(int(s) for s in row["shape"].split("x"))
        tensor = fill_tensor(parity_config["run"]["weight_seed"], row["key"], shape)
        assert tensor_sha256(tensor) == row["sha256_float32_le"], row["key"]
        filled[key] = tensor
    left = set(own) - set(filled)
    assert all(k.endswith("position_ids") for k in left), left  # buffers only
    model.load_state_dict(filled, strict=not left)
    return model


@pytest.fixture(scope="module")
def expected(parity_dir: Path) -> tuple[dict, str]:
    path = parity_dir / "text_encoder.safetensors"
    with safe_open(path, "pt") as f:
        prompt = f.metadata()["prompt"]
    return load_file(path), prompt


class _FixtureIds:
    """Stand-in tokenizer replaying the fixture's real-tokenizer ids (the model path is what is tested here)."""

    def __init__(self, table: dict[str, list[int]]):
        self.table = table

    def __call__(self, prompt: str, truncation: bool = False) -> dict:
        return {"input_ids": self.table[prompt]}


def _unpadded(ref: dict, name: str) -> list[int]:
    return ref[f"{name}.input_ids"][0, : int(ref[f"{name}.attention_mask"].sum())].tolist()


def _check(ours, ref: dict, name: str) -> None:
    torch.testing.assert_close(ours.input_ids, ref[f"{name}.input_ids"], rtol=0, atol=0)
    torch.testing.assert_close(ours.attention_mask, ref[f"{name}.attention_mask"], rtol=0, atol=0)
    diff = ours.hidden - ref[f"{name}.last_hidden_state"]
    assert ours.hidden.shape == ref[f"{name}.last_hidden_state"].shape
    assert diff.abs().max() <= 1e-5 and diff.pow(2).mean().sqrt() <= 1e-6, (name, diff.abs().max().item())


def test_hidden_states_match_with_padding_mask(text_model, expected):
    ref, prompt = expected
    tokenizer = _FixtureIds({prompt: _unpadded(ref, "cond"), "": _unpadded(ref, "uncond")})
    cond, uncond = emotion_embeddings(HFTextEncoder(tokenizer, text_model), prompt)
    _check(cond, ref, "cond")
    _check(uncond, ref, "uncond")
    # the mask matters: without it the pad positions are those of the no-mask variant
    for ours, name in ((cond, "cond"), (uncond, "uncond")):
        pads = ours.attention_mask[0] == 0
        unmasked = ref[f"{name}.last_hidden_state_no_attention_mask"]
        assert (ours.hidden[0, pads] - unmasked[0, pads]).abs().max() > 1e-2


def test_padding_rule(expected):
    ref, _ = expected
    for name in ("cond", "uncond"):
        ids, mask = pad_ids(_unpadded(ref, name))
        torch.testing.assert_close(ids, ref[f"{name}.input_ids"], rtol=0, atol=0)
        torch.testing.assert_close(mask, ref[f"{name}.attention_mask"], rtol=0, atol=0)


def clip_bpe_merges() -> list[str]:
    """The first 48,894 merges of OpenAI's `bpe_simple_vocab_16e6.txt` (those CLIP's 49,408-token vocabulary
    uses), read from the copy embedded in the installed instant-clip-tokenizer extension."""
    import instant_clip_tokenizer

    n = 49408 - 256 * 2 - 2  # vocabulary = 256 byte symbols, the same with `</w>`, the merges, 2 special tokens
    for lib in Path(instant_clip_tokenizer.__file__).parent.iterdir():
        if lib.suffix not in (".so", ".pyd"):
            continue
        data = lib.read_bytes()
        start = data.find(b"#version: 0.2\n")
        if start >= 0:
            merges = data[start:].split(b"\n", n + 1)[1:n + 1]
            if len(merges) == n and all(re.fullmatch(rb"\S+ \S+", m) for m in merges):
                return [m.decode("utf-8") for m in merges]
    raise AssertionError(f"no CLIP BPE merges file found in {instant_clip_tokenizer.__file__}'s extension module")


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    """The real CLIP tokenizer (transformers' CLIPTokenizer) on vocab.json/merges.txt built from the merges."""
    merges = clip_bpe_merges()
    # GPT-2 byte-to-unicode table, then word-final variants, then merges, then the two special tokens
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return load_clip_tokenizer(folder)


def test_real_tokenizer_ids(clip_tokenizer, text_model, expected):
    ref, prompt = expected
    encoder = HFTextEncoder(clip_tokenizer, text_model)
    assert encoder.tokenize("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]
    cond, uncond = emotion_embeddings(encoder, prompt)
    _check(cond, ref, "cond")
    _check(uncond, ref, "uncond")


def test_long_prompt_error_and_truncation(clip_tokenizer, text_model):
    encoder = HFTextEncoder(clip_tokenizer, text_model)
    prompt = " ".join(["sad"] * 70 + ["and", "then", "very", "happy", "again", "at", "the", "end"])
    with pytest.raises(ValueError, match="78 tokens; CLIP takes at most 75: shorten it by 3 tokens"):
        encode_prompt(encoder, prompt)
    out = encode_prompt(encoder, prompt, truncate=True)
    assert out.dropped == "at the end"
    assert out.prompt == " ".join(["sad"] * 70 + ["and", "then", "very", "happy", "again"])
    assert int(out.attention_mask.sum()) == 77 and out.input_ids[0, -1] == 49407


def test_tokenizer_folder_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="lacks vocab.json, merges.txt.*sd1_tokenizer"):
        load_clip_tokenizer(tmp_path)


def test_cli_tokenizer_matches_the_real_vocabulary(clip_tokenizer, expected):
    """The CLI tokenizes with instant-clip-tokenizer (vocabulary inside the wheel): the set's ids, and the same
    ids as transformers' CLIPTokenizer on tricky prompts."""
    from emocast_lib.companions import ClipBpeTokenizer

    ours = ClipBpeTokenizer()
    ref, prompt = expected
    assert ours(prompt)["input_ids"] == _unpadded(ref, "cond") and ours("")["input_ids"] == _unpadded(ref, "uncond")
    for prompt in ["The portrait is watching a horror movie with jump scares.", "", "a photo of a cat",
                   "  Extremely   HAPPY!!! :-) café, naïve; 3.5 times  ", "sad\nand\ttired", "don't-stop (crying)"]:
        assert ours(prompt)["input_ids"] == clip_tokenizer(prompt)["input_ids"], prompt
