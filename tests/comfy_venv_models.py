"""The pack's models inside a real ComfyUI, with ComfyUI's own objects: core's wav2vec2 (Load Audio Encoder's
AUDIO_ENCODER) driven by EmoCAST Audio Encode against the reference features; the EmoCAST network built from
ComfyUI's casting layers, partially loaded by ComfyUI's patcher, and run in bf16/fp16. On tiny stand-in models
(`make-tiny-models`, NOT a real model). Runs in the ComfyUI venv with COMFY_DIR set, as tests/comfy_venv_nodes.py
(tests/test_comfy_venv.py launches both); skipped otherwise.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import comfy_venv_nodes
import numpy as np
import pytest
import torch

# Importing comfy_venv_nodes puts ComfyUI on sys.path, or skips this module where it is not importable. Its
# fixtures: comfy_executor runs every node under inference mode as ComfyUI's executor does; `inputs` are what the
# shipped workflow feeds the sampler.
comfy_executor, models, inputs = comfy_venv_nodes.comfy_executor, comfy_venv_nodes.models, comfy_venv_nodes.inputs

import comfy.model_management as mm
import comfy.model_patcher
from comfy.audio_encoders.wav2vec2 import Wav2Vec2Model as CoreWav2Vec2Model
from comfy.cli_args import args
from comfy_audio_encoder import core_audio_encoder
from safetensors.numpy import load_file

from emocast_lib import audio as audio_lib
from packimport import pack_module

nodes_audio, nodes_loaders, types = pack_module("audio"), pack_module("loaders"), pack_module("types")
nodes_sampler = pack_module("sampler")


def speech_cases(audio_dir: Path) -> list[str]:
    names = sorted(p.stem for p in audio_dir.glob("*.wav") if p.with_suffix(".safetensors").is_file())
    assert names, f"no <name>.wav + <name>.safetensors cases in {audio_dir}"
    return names


def comfy_audio(path: Path) -> dict:
    """The file as ComfyUI's AUDIO (16-bit PCM -> value / 32768, as core Load Audio decodes it)."""
    wave, rate = audio_lib.load_audio_file(path)
    return {"waveform": torch.from_numpy(wave)[None], "sample_rate": rate}


def encode_cases(audio_dir: Path, encoder) -> dict[str, float]:
    """Max |difference| of EmoCAST Audio Encode's windows from the reference's, per speech case."""
    diffs = {}
    for name in speech_cases(audio_dir):
        ref = load_file(audio_dir / f"{name}.safetensors")
        cond = nodes_audio.AudioEncode.execute(comfy_audio(audio_dir / f"{name}.wav"), encoder, 25, 16)[0]
        assert cond.length == int(ref["audio_length"][0]), name
        assert cond.windows.shape == ref["audio_emb_windowed"].shape, name
        diffs[name] = float(np.abs(cond.windows.numpy() - ref["audio_emb_windowed"]).max())
    return diffs


def test_core_audio_encoder_gives_the_reference_features(preprocess_dir: Path, monkeypatch):
    audio_dir = preprocess_dir / "audio"
    monkeypatch.setattr(args, "fp32_text_enc", True)  # `main.py --fp32-text-enc`: weights kept in fp32
    encoder = core_audio_encoder(audio_dir / "tiny_wav2vec2_hubstyle")
    assert encoder.dtype == torch.float32
    diffs = encode_cases(audio_dir, encoder)
    assert max(diffs.values()) <= 1e-4, diffs  # measured: 4.4e-6 (mono 16 kHz), 2.1e-6 (stereo 44.1 kHz)


def test_core_audio_encoder_with_its_default_fp16_weights(preprocess_dir: Path):
    """ComfyUI stores audio encoders in fp16 by default (text_encoder_dtype), which rounds the weights; the
    features then stay close to the reference, not within its 1e-4 (README: use --fp32-text-enc)."""
    audio_dir = preprocess_dir / "audio"
    encoder = core_audio_encoder(audio_dir / "tiny_wav2vec2_hubstyle")
    assert encoder.dtype == torch.float16
    diffs = encode_cases(audio_dir, encoder)
    assert max(diffs.values()) <= 1e-2, diffs  # measured: 4.2e-3 and 2.9e-3 (|features| <= 3.8)


def test_single_file_reads_the_same_in_core_and_in_the_cli(tmp_path: Path, preprocess_dir: Path, monkeypatch):
    """A full-size wav2vec2-base file in the public checkpoint's layout (fill-rule weights: NOT a real model)
    through core's Load Audio Encoder + EmoCAST Audio Encode, and through the library's transformers loader
    (the CLI's path): the same features."""
    from safetensors.torch import save_file
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from emocast_lib.bench.tiny import fill_module

    sd = fill_module(Wav2Vec2Model(Wav2Vec2Config(**audio_lib.WAV2VEC2_BASE)), seed=5).state_dict()
    public = {"wav2vec2." + k.replace("parametrizations.weight.original0", "weight_g").replace(
        "parametrizations.weight.original1", "weight_v"): v for k, v in sd.items()}
    public |= {"lm_head.weight": torch.zeros(32, 768), "lm_head.bias": torch.zeros(32)}
    path = tmp_path / "audio_encoders" / "wav2vec2-base-960h.safetensors"
    path.parent.mkdir()
    save_file(public, path)
    del sd, public

    monkeypatch.setattr(args, "fp32_text_enc", True)
    speech = comfy_audio(preprocess_dir / "audio" / f"{speech_cases(preprocess_dir / 'audio')[0]}.wav")
    core = nodes_audio.AudioEncode.execute(speech, core_audio_encoder(path), 25, 16)[0].windows
    wave16k = audio_lib.to_16k_mono(speech["waveform"][0], speech["sample_rate"])
    cli = audio_lib.encode_audio(wave16k, audio_lib.load_wav2vec2(path)).windowed
    assert core.shape[-2:] == (12, 768)
    torch.testing.assert_close(core, cli, rtol=0, atol=1e-4)  # measured: 3.1e-6 (|features| <= 5.6)


def test_audio_encode_refuses_other_audio_encoders():
    whisper_like = SimpleNamespace(model=torch.nn.Linear(1, 1), patcher=None, load_device=mm.get_torch_device())
    with pytest.raises(types.EmoCASTInputError, match="audio_encoder: is a Linear, not a wav2vec2"):
        nodes_audio.AudioEncode.execute({"waveform": torch.zeros(1, 1, 16000), "sample_rate": 16000},
                                        whisper_like, 25, 16)
    with torch.device("meta"):  # shapes only: core's wav2vec2 large
        large = CoreWav2Vec2Model(embed_dim=1024, num_heads=16, num_layers=24, do_stable_layer_norm=True,
                                  operations=torch.nn)
    with pytest.raises(types.EmoCASTInputError, match="audio_encoder: is a large .*wav2vec2-base-960h"):
        nodes_audio.AudioEncode.execute({"waveform": torch.zeros(1, 1, 16000), "sample_rate": 16000},
                                        SimpleNamespace(model=large, patcher=None, load_device=None), 25, 16)


def with_free_gpu_memory(model, budget: int, monkeypatch) -> None:
    """Stand-in for a GPU with `budget` bytes free (none here): when the sampler asks ComfyUI to load `model`,
    ComfyUI's own per-model load runs with that budget, as load_models_gpu does once it has measured the free
    VRAM (on a CPU device ComfyUI always loads whole). Other models load as usual."""
    real = mm.load_models_gpu

    def load_models_gpu(patchers, *args, **kwargs):
        if list(patchers) != [model]:
            return real(patchers, *args, **kwargs)
        loaded = mm.LoadedModel(model)
        loaded.model_load(lowvram_model_memory=budget)
        mm.current_loaded_models.insert(0, loaded)

    monkeypatch.setattr(mm, "load_models_gpu", load_models_gpu)


def test_partial_load_keeps_weights_offloaded_and_makes_the_same_clip(inputs, monkeypatch):
    model = inputs["model"]
    mm.unload_all_models()
    full = nodes_sampler.Sampler.execute(**inputs)[0]
    assert model.loaded_size() == model.model_size()
    mm.unload_all_models()

    budget = model.model_size() // 3
    with_free_gpu_memory(model, budget, monkeypatch)
    partial = nodes_sampler.Sampler.execute(**inputs)[0]
    try:
        net = model.model
        assert net.model_lowvram and 0 < model.loaded_size() <= budget < model.model_size()
        layers = {n: m for n, m in net.named_modules() if hasattr(m, "comfy_cast_weights")}
        # offloaded: layers whose weights ComfyUI left where they were, cast onto the load device per call
        offloaded = [n for n, m in layers.items() if hasattr(m, "prev_comfy_cast_weights")]
        loaded = [n for n, m in layers.items() if getattr(m, "comfy_patched_weights", False)]
        assert offloaded and loaded and not set(offloaded) & set(loaded)
        # every weight either was loaded or is cast on use: none would be left behind on another device
        holders = {n for n, m in net.named_modules() if any(True for _ in m.parameters(recurse=False))}
        assert holders == set(offloaded) | set(loaded)
        size = {n: sum(p.numel() * p.element_size() for p in layers[n].parameters()) for n in layers}
        assert sum(size[n] for n in loaded) == model.loaded_size()
    finally:
        mm.unload_all_models()
    assert (partial - full).abs().max() <= 1e-5  # fp32; measured: 0


@pytest.mark.parametrize("precision,bound", [("bf16", 0.15), ("fp16", 0.04)])
def test_network_in_half_precision_runs_through_the_nodes(inputs, precision: str, bound: float):
    """The Model Loader's bf16/fp16 (weights and computation) end to end on the CPU: no dtype mixing between
    the network, the pipeline's tensors and ComfyUI's fp32 VAE; frames close to fp32's."""
    mm.unload_all_models()
    full = nodes_sampler.Sampler.execute(**inputs)[0]
    half = nodes_loaders.ModelLoader.execute("net.pth", precision)[0]
    assert next(half.model.parameters()).dtype == nodes_loaders.PRECISIONS[precision]
    assert nodes_loaders.compute_dtype(half) == nodes_loaders.PRECISIONS[precision]
    frames = nodes_sampler.Sampler.execute(**{**inputs, "model": half})[0]
    mm.unload_all_models()
    assert frames.dtype == torch.float32 and frames.shape == full.shape
    assert (frames - full).abs().max() <= bound  # frames in [0, 1]; measured: bf16 0.061, fp16 0.014


@pytest.mark.skipif(not hasattr(comfy.model_patcher, "ModelPatcherDynamic"),
                    reason="this ComfyUI has no Dynamic VRAM patcher (ComfyUI 0.33.0 and newer have one)")
def test_model_loader_follows_the_dynamic_vram_set_up_of_main_py(inputs, monkeypatch):
    """What main.py does when it enables Dynamic VRAM (an NVIDIA GPU: not here): CoreModelPatcher becomes
    ModelPatcherDynamic and comfy.ops layers are built empty, to take the loaded tensors as they are (core's
    loaders then load with assign=True). ModelPatcherDynamic itself cannot be built without a GPU (comfy-aimdo),
    so a ModelPatcher subclass stands in for it, named as such. The Model Loader builds its patcher from
    whatever CoreModelPatcher is then, never a legacy clone, and the network it loads under the empty-layer
    ops is the same network: the same frames."""
    import comfy.memory_management

    class DynamicStandIn(comfy.model_patcher.ModelPatcher):
        """Stands in for ModelPatcherDynamic (which needs a GPU); refuses what the dynamic patcher refuses."""

        def clone(self, disable_dynamic=False, *args, **kwargs):
            assert not disable_dynamic, "a legacy (disable_dynamic) clone of the pack's model"
            return super().clone(*args, **kwargs)

    with monkeypatch.context() as dynamic:
        dynamic.setattr(comfy.model_patcher, "CoreModelPatcher", DynamicStandIn)
        dynamic.setattr(comfy.memory_management, "aimdo_enabled", True)
        model = nodes_loaders.ModelLoader.execute("net.pth", "fp32")[0]
    assert type(model) is DynamicStandIn and type(model.clone()) is DynamicStandIn
    layers = [m for m in model.model.modules() if hasattr(m, "comfy_cast_weights")]
    assert layers and all(m.weight is not None and m.weight.device == mm.unet_offload_device() for m in layers
                          if hasattr(m, "weight"))
    mm.unload_all_models()
    legacy = nodes_sampler.Sampler.execute(**inputs)[0]
    assert torch.equal(nodes_sampler.Sampler.execute(**{**inputs, "model": model})[0], legacy)
    mm.unload_all_models()
