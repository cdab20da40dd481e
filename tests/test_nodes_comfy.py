"""The nodes called in-process with ComfyUI's own objects (comfy.sd CLIP and VAE, ModelPatcher,
model_management interrupt, ProgressBar hook) on tiny stand-in models (`make-tiny-models`, NOT a
real model). Needs ComfyUI importable: run with the ComfyUI venv's python and COMFY_DIR set
(tests/test_comfy_nodes.py does that from the normal suite); skipped otherwise.

Also a script: `python tests/test_nodes_comfy.py MODELS_DIR OUT.pt` samples once in a fresh process.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
INPUTS = ROOT / "workflows" / "inputs"
COMFY_DIR = os.environ.get("COMFY_DIR")


def _import_comfy() -> str | None:
    if not COMFY_DIR or not Path(COMFY_DIR, "comfy_api").is_dir():
        return "set COMFY_DIR to a ComfyUI tree and run with its venv's python"
    sys.path.insert(0, COMFY_DIR)
    try:
        from comfy.cli_args import args

        args.cpu = args.cpu or not torch.cuda.is_available()  # what `main.py --cpu` sets on a CPU-only machine
        import comfy.model_management  # noqa: F401
        import folder_paths  # noqa: F401
        from comfy_api.latest import io  # noqa: F401
    except ImportError as e:
        sys.path.remove(COMFY_DIR)
        return f"ComfyUI is not importable with this python ({e}); run with the ComfyUI venv"
    return None


SKIP = _import_comfy()
if SKIP:
    if __name__ == "__main__":
        sys.exit(SKIP)
    pytest.skip(SKIP, allow_module_level=True)

import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
from comfy_audio_encoder import core_audio_encoder  # noqa: E402

from packimport import pack_module  # noqa: E402

ext = pack_module("extension")
nodes_audio, nodes_emotion, nodes_face = pack_module("audio"), pack_module("emotion"), pack_module("face")
nodes_loaders, nodes_sampler, types = pack_module("loaders"), pack_module("sampler"), pack_module("types")
from emocast_lib import layout  # after packimport, which puts the pack on sys.path (also when run as a script)

STEPS = 3
SECONDS = 0.4  # 10 frames at 25 fps: one 16-frame clip


def register_models(models: Path) -> None:
    for folder in ("emocast", "vae", "text_encoders"):
        folder_paths.add_model_folder_path(folder, str(models / folder))


def load_image(path: Path) -> torch.Tensor:
    from PIL import Image

    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), np.float32) / 255)[None]


def load_speech(seconds: float) -> dict:
    import soundfile

    wave, rate = soundfile.read(INPUTS / "speech.wav", dtype="float32", always_2d=True)
    return {"waveform": torch.from_numpy(wave.T[:, :round(seconds * rate)].copy())[None], "sample_rate": rate}


def load_clip(models: Path, clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION):
    return comfy.sd.load_clip([str(models / "text_encoders" / "clip_l.safetensors")], clip_type=clip_type)


def sampler_inputs(models: Path) -> dict:
    """What the shipped talking-portrait workflow feeds the sampler, with a short speech."""
    portrait = load_image(INPUTS / "portrait.png")
    face = nodes_face.FaceAnalysis.execute(portrait, "face_analysis/models", 1.2, True)[0]
    encoder = core_audio_encoder(layout.WAV2VEC.path(models))
    audio = nodes_audio.AudioEncode.execute(load_speech(SECONDS), encoder, 25, 16)[0]
    emotion = nodes_emotion.EmotionEncode.execute(load_clip(models), nodes_emotion.DEFAULT_EMOTION)[0]
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(models / "vae" / "vae-ft-mse-840000-ema-pruned.safetensors")))
    return dict(model=nodes_loaders.ModelLoader.execute("net.pth", "auto")[0], vae=vae, portrait=portrait, face=face,
                emocast_audio=audio, emotion=emotion, steps=STEPS, cfg=3.5, seed=7, pose_weight=1.0,
                face_weight=1.0, lip_weight=1.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    given = os.environ.get("EMOCAST_TINY_MODELS")
    out = Path(given) if given else tmp_path_factory.mktemp("tiny_models")
    if not given:
        subprocess.run([sys.executable, "-m", "emocast_lib", "make-tiny-models", str(out)], cwd=ROOT, check=True,
                       capture_output=True, timeout=600)
    register_models(out)
    return out


@pytest.fixture(scope="module")
def inputs(models: Path) -> dict:
    with torch.inference_mode():
        return sampler_inputs(models)


@pytest.fixture(autouse=True)
def comfy_executor():
    """ComfyUI's executor runs every node under torch.inference_mode() (execution.py)."""
    with torch.inference_mode():
        yield


def test_cancel_stops_within_one_step_and_rerun_matches_a_fresh_process(inputs, models, tmp_path):
    updates = []

    def hook(value, total, preview, node_id=None):
        # as main.py's hook: every progress update is an interrupt point ...
        mm.throw_exception_if_processing_interrupted()
        updates.append((value, total))
        if value == 2:  # ... and the user presses Cancel while step 3 is running
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            nodes_sampler.Sampler.execute(**inputs)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert updates == [(1, STEPS), (2, STEPS)], "sampling went on after Cancel"
    assert not mm.processing_interrupted(), "the interrupt flag must be consumed"

    frames, audio, fps, latent = nodes_sampler.Sampler.execute(**inputs).args
    assert frames.shape == (10, 64, 64, 3) and fps == 25.0
    assert audio["waveform"].shape[-1] == math.ceil(10 * audio["sample_rate"] / 25)
    assert latent["samples"].shape == (10, 4, 8, 8)
    # core VAE Decode of the LATENT output gives the frames back
    assert torch.allclose(inputs["vae"].decode(latent["samples"]), frames, atol=2e-3)

    fresh = tmp_path / "fresh.pt"
    subprocess.run([sys.executable, __file__, str(models), str(fresh)], check=True, timeout=900,
                   env={**os.environ, "COMFY_DIR": COMFY_DIR})
    assert torch.equal(torch.load(fresh), frames)


def test_portrait_the_sampler_cannot_take_points_to_crop_portrait(inputs):
    wide = load_image(INPUTS / "portrait.png")[:, :, :280]
    face = nodes_face.FaceAnalysis.execute(wide, "face_analysis/models", 1.2, False)[0]
    with pytest.raises(types.EmoCASTInputError, match=r"portrait: is 280x320.*Crop Portrait"):
        nodes_sampler.Sampler.execute(**{**inputs, "portrait": wide, "face": face})
    with pytest.raises(types.EmoCASTInputError, match="not the image EmoCAST Face Analysis analysed"):
        nodes_sampler.Sampler.execute(**{**inputs, "portrait": wide})


def test_crop_portrait_makes_a_square_model_size_image():
    out = nodes_face.CropPortrait.execute(load_image(INPUTS / "portrait.png"), "face_analysis/models", 128, 2.0)
    image, info = out.args
    assert image.shape == (1, 128, 128, 3) and 0 <= image.min() and image.max() <= 1
    assert info.size == 128 and info.side <= 320


def test_no_face_is_an_error_naming_the_image(models):
    blank = torch.full((1, 256, 256, 3), 0.5)
    with pytest.raises(types.EmoCASTInputError, match="image: no face found"):
        nodes_face.FaceAnalysis.execute(blank, "face_analysis/models", 1.2, True)


def test_empty_or_too_short_audio(models):
    encoder = core_audio_encoder(layout.WAV2VEC.path(models))
    empty = {"waveform": torch.zeros(1, 1, 0), "sample_rate": 16000}
    with pytest.raises(types.EmoCASTInputError, match="audio is empty"):
        nodes_audio.AudioEncode.execute(empty, encoder, 25, 16)
    short = {"waveform": torch.randn(1, 2, 1000), "sample_rate": 48000}  # 333 samples at 16 kHz < 640
    with pytest.raises(types.EmoCASTInputError, match="audio: .*shorter than one video frame"):
        nodes_audio.AudioEncode.execute(short, encoder, 25, 16)


def test_missing_files_say_where_they_go_and_where_to_get_them(models):
    message = nodes_face.FaceAnalysis.validate_inputs("nope")
    assert "models/emocast/face_analysis/models" in message and "download" in message
    message = nodes_loaders.ModelLoader.validate_inputs("missing.pth")
    assert "net.pth" in message and "huggingface.co" in message
    assert nodes_loaders.ModelLoader.validate_inputs("net.pth") is True
    message = nodes_audio.VocalSeparator.validate_inputs("audio_separator/Kim_Vocal_2.onnx")
    assert "models/emocast/audio_separator/Kim_Vocal_2.onnx" in message and "github.com/TRvlvr" in message


def test_combos_list_model_files_only(models):
    paths = pack_module("paths")
    assert "net.pth" in paths.checkpoints()
    assert not [c for c in paths.checkpoints() if c.split("/")[0] in paths.COMPANION_DIRS]
    assert list(paths.face_model_folders()) == ["face_analysis/models"]
    assert Path(folder_paths.models_dir, "emocast") in paths.roots()  # the default folder stays registered


def test_checkpoint_that_is_not_emocast(models, tmp_path):
    import shutil

    other = tmp_path / "emocast"
    other.mkdir()
    shutil.copy(models / "vae" / "vae-ft-mse-840000-ema-pruned.safetensors", other / "not_emocast.safetensors")
    folder_paths.add_model_folder_path("emocast", str(other))
    with pytest.raises(ValueError, match="does not match the EmoCAST network.*looks like a VAE"):
        nodes_loaders.ModelLoader.execute("not_emocast.safetensors", "auto")


def test_clip_that_is_not_clip_l(models):
    clip = load_clip(models, comfy.sd.CLIPType.SD3)
    with pytest.raises(types.EmoCASTInputError, match="clip: EmoCAST needs an SD1.5 CLIP-L"):
        nodes_emotion.EmotionEncode.execute(clip, "happy")


def test_emotion_schedule_checks_ranges(models):
    clip = load_clip(models)
    calm = nodes_emotion.EmotionEncode.execute(clip, "calm")[0]
    scared = nodes_emotion.EmotionEncode.execute(clip, "scared")[0]
    ranges = dict(start_1=0.0, end_1=1.0, start_2=1.5, end_2=3.0, start_3=0.0, end_3=1.0, start_4=0.0, end_4=1.0)
    out = nodes_emotion.EmotionSchedule.execute(0.4, emotion_1=calm, emotion_2=scared, **ranges)
    schedule = out[0]
    assert len(schedule.segments) == 2 and "crossfade 0.4 s" in out.ui.as_dict()["text"][0]
    frames = schedule.per_frame(25, 80)
    assert torch.allclose(frames[0], calm.segments[0][0]) and torch.allclose(frames[-1], scared.segments[0][0])
    with pytest.raises(types.EmoCASTInputError, match="start/end: emotion segments overlap"):
        nodes_emotion.EmotionSchedule.execute(0.4, emotion_1=calm, emotion_2=scared, **{**ranges, "start_2": 0.5})


if __name__ == "__main__":  # a fresh process: load everything and sample once
    torch.set_num_threads(1)  # as tests/conftest.py
    register_models(Path(sys.argv[1]))
    with torch.inference_mode():
        frames = nodes_sampler.Sampler.execute(**sampler_inputs(Path(sys.argv[1])))[0]
    torch.save(frames.clone(), sys.argv[2])


def test_sampler_to_video_streams_an_mp4_with_the_speech(inputs, tmp_path, monkeypatch):
    import av

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    result = nodes_sampler.SamplerToVideo.execute(**inputs, filename_prefix="emo/stream")
    saved = result.ui.as_dict()["images"][0]
    path = tmp_path / saved.subfolder / saved.filename
    with av.open(str(path)) as container:
        assert sum(1 for _ in container.decode(video=0)) == math.ceil(SECONDS * 25)
        assert container.streams.audio, "the mp4 carries the speech"
    assert not list(tmp_path.rglob("*.part"))
