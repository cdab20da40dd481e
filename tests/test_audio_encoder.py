"""wav2vec2 loading for the library/CLI path: ComfyUI's one-file layout (models/audio_encoders) and its errors.
The features themselves are checked against the reference in test_preprocess_audio.py, and through ComfyUI
core's wav2vec2 in test_nodes_comfy_models.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from emocast_lib import audio


@pytest.mark.slow
def test_single_file_in_the_public_layout_loads_as_wav2vec2_base(tmp_path: Path):
    """Fill-rule weights (NOT a real model) saved as facebook/wav2vec2-base-960h's model.safetensors is laid out:
    `wav2vec2.` prefix, weight_g/weight_v, lm_head, fp16 here."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from emocast_lib.bench.tiny import fill_module

    sd = fill_module(Wav2Vec2Model(Wav2Vec2Config(**audio.WAV2VEC2_BASE)), seed=3).state_dict()
    rename = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    public = {"wav2vec2." + next((k.replace(a, b) for a, b in rename.items() if a in k), k): v.half()
              for k, v in sd.items()}
    path = tmp_path / "wav2vec2-base-960h.safetensors"
    save_file({**public, "lm_head.weight": torch.zeros(32, 768), "lm_head.bias": torch.zeros(32)}, path)

    model = audio.load_wav2vec2(path)
    assert model.config.hidden_size == 768 and not model.training
    loaded = model.state_dict()
    assert loaded.keys() == sd.keys()
    for key, value in sd.items():
        assert loaded[key].dtype == torch.float32
        torch.testing.assert_close(loaded[key], value.half().float(), rtol=0, atol=0, msg=key)


def test_single_file_of_another_size_says_what_to_do(tmp_path: Path, preprocess_dir: Path):
    tiny = preprocess_dir / "audio" / "tiny_wav2vec2_hubstyle" / "model.safetensors"
    with pytest.raises(ValueError, match=r"a single file must be wav2vec2-base-960h \(hidden size 768, this one "
                                         r"has 32\); other sizes need a folder with their config.json"):
        audio.load_wav2vec2(tiny)
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="neither a .safetensors file nor a folder"):
        audio.load_wav2vec2(tmp_path / "model.bin")
    partial = tmp_path / "partial.safetensors"
    save_file({"wav2vec2.masked_spec_embed": torch.zeros(768)}, partial)
    with pytest.raises(ValueError, match="not a matching wav2vec2 checkpoint: it lacks"):
        audio.load_wav2vec2(partial)
