"""The nodes called in-process with ComfyUI's own objects (comfy.sd CLIP and VAE, ModelPatcher,
model_management interrupt, ProgressBar hook) on tiny stand-in models (`make-tiny-models`, NOT a
real model). Needs ComfyUI importable: run with the ComfyUI venv's python and COMFY_DIR set
(tests/test_comfy_venv.py does that from the normal suite); skipped otherwise.

Also a script: `python tests/comfy_venv_nodes.py MODELS_DIR OUT.pt` samples once in a fresh process.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
INPUTS = ROOT / "example_workflows" / "inputs"
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

# importing the pack copies the example inputs into ComfyUI's input folder: a throwaway one here
INPUT_DIR = tempfile.mkdtemp(prefix="emocast_input_")
folder_paths.set_input_directory(INPUT_DIR)
ext = pack_module("extension")  # also puts emocast_lib on sys.path, as the pack's __init__ does

from emocast_lib import layout  # noqa: E402
from emocast_lib.config import DEFAULT_EMOTION  # noqa: E402
from emocast_lib.face import PortraitCrop, crop_portrait, feather_mask  # noqa: E402

nodes_audio, nodes_emotion, nodes_face = pack_module("audio"), pack_module("emotion"), pack_module("face")
nodes_loaders, nodes_sampler, types = pack_module("loaders"), pack_module("sampler"), pack_module("types")
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

    wave, rate = soundfile.read(INPUTS / "emocast_speech.wav", dtype="float32", always_2d=True)
    return {"waveform": torch.from_numpy(wave.T[:, :round(seconds * rate)].copy())[None], "sample_rate": rate}


def load_clip(models: Path, clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION):
    return comfy.sd.load_clip([str(models / "text_encoders" / "clip_l.safetensors")], clip_type=clip_type)


def sampler_inputs(models: Path) -> dict:
    """What the shipped talking-portrait workflow feeds the sampler, with a short speech."""
    portrait = load_image(INPUTS / "emocast_portrait.png")
    face = nodes_face.FaceAnalysis.execute(portrait, "face_analysis/models", 1.2, True)[0]
    encoder = core_audio_encoder(layout.WAV2VEC.path(models))
    audio = nodes_audio.AudioEncode.execute(load_speech(SECONDS), encoder, 25, 16)[0]
    emotion = nodes_emotion.EmotionEncode.execute(load_clip(models), DEFAULT_EMOTION)[0]
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(models / "vae" / "vae-ft-mse-840000-ema-pruned.safetensors")))
    return dict(model=nodes_loaders.ModelLoader.execute("net.pth", "auto")[0], vae=vae, face=face,
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
    wide = load_image(INPUTS / "emocast_portrait.png")[:, :, :280]
    face = nodes_face.FaceAnalysis.execute(wide, "face_analysis/models", 1.2, False)[0]
    with pytest.raises(types.EmoCASTInputError, match=r"face: the portrait .* is 280x320.*Crop Portrait"):
        nodes_sampler.Sampler.execute(**{**inputs, "face": face})


def test_no_identity_is_the_zero_embedding_of_the_model_width(inputs):
    """identity off: the same video as an identity that is all zeros, whatever the model's width (and an
    old workflow's portrait link changes nothing)."""
    face = inputs["face"]
    off = nodes_face.FaceAnalysis.execute(face.image[None], "face_analysis/models", 1.2, False)[0]
    assert off.identity is None
    zeros = types.FaceInfo(face.image, face.landmarks, np.zeros_like(face.identity), face.expand_ratio)
    args = {**inputs, "steps": 1}
    # a workflow saved before 0.2.0 still links the removed `portrait` input: ComfyUI passes it, it is ignored
    legacy = {**args, "face": off, "portrait": torch.zeros(1, 8, 8, 3)}
    assert torch.equal(nodes_sampler.Sampler.execute(**legacy)[0],
                       nodes_sampler.Sampler.execute(**{**args, "face": zeros})[0])


def test_crop_portrait_then_paste_back_gives_the_photo_back_with_the_frames_inside():
    photo = load_image(INPUTS / "emocast_photo.jpg")
    portrait, crop = nodes_face.CropPortrait.execute(photo, "face_analysis/models", 128, 2.0).args
    assert portrait.shape == (1, 128, 128, 3) and isinstance(crop, PortraitCrop)
    assert (crop.photo_height, crop.photo_width) == photo.shape[1:3]
    # the crop is the library's own crop of the same photo, with the landmarks Crop Portrait found
    pixels = (photo[0] * 255).round().to(torch.uint8).numpy()
    landmarks = nodes_face.detect_landmarks(nodes_face.face_folder("face_analysis/models"), pixels)
    assert crop_portrait(pixels, landmarks, 2.0)[1] == crop

    feather = 8
    frames = torch.rand(3, crop.side, crop.side, 3)  # frames at the crop size: no resampling inside
    out = nodes_face.PasteBack.execute(frames, crop, photo, feather)[0]
    assert out.shape == (3, *photo.shape[1:])
    alpha = feather_mask(crop, feather)
    touched = torch.zeros(photo.shape[1:3], dtype=torch.bool)
    touched[crop.y0:crop.y0 + crop.side, crop.x0:crop.x0 + crop.side] = alpha > 0
    assert torch.equal(out[:, ~touched], photo[0][~touched].expand(3, -1, -1)), "outside the crop: the photo"
    inside = torch.zeros_like(touched)
    inside[crop.y0:crop.y0 + crop.side, crop.x0:crop.x0 + crop.side] = alpha == 1
    assert inside.any() and torch.equal(out[:, inside], frames[:, alpha == 1]), "inside the feather: the frames"
    centre = crop.side // 2
    assert torch.equal(out[:, crop.y0 + centre, crop.x0 + centre], frames[:, centre, centre])

    with pytest.raises(types.EmoCASTInputError, match="photo: is 280x360 but crop_info comes from a 512x360 photo"):
        nodes_face.PasteBack.execute(frames, crop, photo[:, :, :280], feather)


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
    for file in (*layout.IDENTITY, layout.LANDMARKER):
        assert f"models/emocast/{file.name}" in message and file.source in message
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


def test_example_inputs_are_put_into_the_input_folder_without_overwriting(tmp_path, monkeypatch):
    shipped = sorted(f.name for f in INPUTS.iterdir())
    assert sorted(os.listdir(INPUT_DIR)) == shipped, "importing the pack copies the templates' inputs"
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path))
    mine = tmp_path / "emocast_speech.wav"
    mine.write_bytes(b"the user's own file")
    examples = pack_module("examples")
    written = examples.install_inputs()
    assert mine.read_bytes() == b"the user's own file"
    assert sorted(p.name for p in written) == [name for name in shipped if name != mine.name]
    assert all(p.read_bytes() == (INPUTS / p.name).read_bytes() for p in written)
    assert examples.install_inputs() == [] and not list(tmp_path.glob(".*"))


def _stand_in_separator(folder: Path) -> None:
    """A stand-in for Kim_Vocal_2.onnx that audio-separator accepts (NOT the real model): an Identity ONNX
    graph on the MDX spectrogram input, under the real file name, with audio-separator's three JSON files
    listing it and registering its md5 with Kim_Vocal_2's MDX parameters, so nothing is downloaded."""
    import hashlib

    import onnx
    from onnx import TensorProto, helper

    dims = {"compensate": 1.0, "mdx_dim_f_set": 3072, "mdx_dim_t_set": 8, "mdx_n_fft_scale_set": 7680,
            "primary_stem": "Vocals"}
    spec = ["batch", 4, dims["mdx_dim_f_set"], 2 ** dims["mdx_dim_t_set"]]
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "stand_in_vocals",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, spec)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, spec)])
    model = folder / "Kim_Vocal_2.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), model)
    md5 = hashlib.md5(model.read_bytes()).hexdigest()  # audio-separator hashes small files whole
    lists = ("mdx_download_list", "mdx_download_vip_list", "vr_download_list", "demucs_download_list",
             "mdx23c_download_list", "mdx23c_download_vip_list", "roformer_download_list")
    checks = {name: {} for name in lists} | {"mdx_download_list": {"MDX-Net Model: Kim Vocal 2": model.name}}
    (folder / "download_checks.json").write_text(json.dumps(checks))
    (folder / "mdx_model_data.json").write_text(json.dumps({md5: dims}))
    (folder / "vr_model_data.json").write_text("{}")


def test_vocal_separator_runs_audio_separator_offline_on_a_stand_in_model(tmp_path, monkeypatch):
    """The Vocal Separator node through audio-separator's real MDX path (ffmpeg check, model list, md5
    lookup, STFT, onnxruntime, stem writing through pydub + ffmpeg) and the reference's 16 kHz reload. The
    stand-in is an identity on the spectrogram, so the "vocals" of clean speech are that speech. Not
    covered: Kim_Vocal_2's own weights. ffmpeg: the one on PATH, else imageio-ffmpeg's static build."""
    import shutil
    import socket

    import soundfile

    pytest.importorskip("audio_separator", reason="audio-separator is not installed (install.py installs it)")
    if shutil.which("ffmpeg") is None:
        imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="no ffmpeg program: install ffmpeg or "
                                                                      "imageio-ffmpeg")
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "ffmpeg").symlink_to(imageio_ffmpeg.get_ffmpeg_exe())
        monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")

    def no_network(*args, **kwargs):
        raise AssertionError("the separator tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(folder_paths, "get_temp_directory", lambda: str(tmp_path / "temp"))
    root = tmp_path / "models" / "emocast"
    (root / "audio_separator").mkdir(parents=True)
    _stand_in_separator(root / "audio_separator")
    folder_paths.add_model_folder_path("emocast", str(root))
    assert nodes_audio.VocalSeparator.validate_inputs("audio_separator/Kim_Vocal_2.onnx") is True

    speech = load_speech(2.0)
    vocals = nodes_audio.VocalSeparator.execute(speech, "audio_separator/Kim_Vocal_2.onnx")[0]
    assert vocals["sample_rate"] == 16000 and vocals["waveform"].shape[:2] == (1, 1)
    heard = vocals["waveform"][0, 0].numpy()
    wave, rate = soundfile.read(INPUTS / "emocast_speech.wav", dtype="float32")
    assert rate == 16000
    said = wave[:len(heard)]
    assert abs(len(heard) - round(2.0 * rate)) <= 1
    # the same waveform (MDX's STFT round trip rescales it: the real model's weights absorb that gain)
    assert np.corrcoef(heard, said)[0, 1] > 0.99 and np.std(heard) > 0.1 * np.std(said)
    assert not list((tmp_path / "temp").rglob("*.wav")), "the node's temporary files are removed"


def test_this_venv_has_what_install_py_promises():
    """After requirements.txt + install.py (what ComfyUI-Manager runs; .ci/run installs the CI venv that
    way): insightface 2.1 for identity, one OpenCV distribution (mediapipe's contrib build, whole), and a
    second install.py run finds everything in place and installs nothing."""
    import importlib.metadata

    import cv2

    dists = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    assert importlib.metadata.version("insightface") == "2.1"
    assert sorted(d for d in dists if d.startswith("opencv")) == ["opencv-contrib-python"]
    assert hasattr(cv2, "xfeatures2d") and hasattr(cv2, "GaussianBlur"), "cv2 is the whole contrib build"
    proc = subprocess.run([sys.executable, str(ROOT / "install.py")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "running:" not in proc.stdout, proc.stdout  # nothing to install the second time
    assert proc.stdout.count("is installed") >= 3 and "only opencv-contrib-python" in proc.stdout


def test_steps_zero_runs_the_count_the_checkpoint_declares(inputs):
    """The Model Loader keeps the checkpoint's declared step count (the tiny net declares it); the sampler's
    steps 0 runs that many per clip, as the templates ask for."""
    from emocast_lib.bench.tiny import TINY_STEPS
    from emocast_lib.checkpoint import STEPS_KEY

    assert inputs["model"].model_options[STEPS_KEY] == TINY_STEPS
    totals = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: totals.append(total))
    try:
        nodes_sampler.Sampler.execute(**{**inputs, "steps": 0})
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert set(totals) == {TINY_STEPS}  # one clip of TINY_STEPS steps


def test_speed_levers_reach_the_sampler_and_default_to_the_released_setting(inputs):
    """The levers are optional inputs at the end: leaving them out is the released DDIM, every-step guidance,
    no cache; a set lever changes the frames (it reaches job.sampling_config); a bad one is named."""
    released = nodes_sampler.Sampler.execute(**inputs)[0]
    explicit = nodes_sampler.Sampler.execute(**inputs, scheduler="ddim", cfg_end=1.0, cache_interval=1)[0]
    assert torch.equal(released, explicit)
    for lever in ({"scheduler": "dpmpp_2m"}, {"cfg_end": 0.5}, {"cache_interval": 2}):
        assert not torch.equal(released, nodes_sampler.Sampler.execute(**inputs, **lever)[0]), lever
    with pytest.raises(types.EmoCASTInputError, match="cache_interval"):
        nodes_sampler.Sampler.execute(**inputs, cache_interval=0)
    names = [i.id for i in nodes_sampler.SamplerToVideo.define_schema().inputs]
    assert names[-5:] == ["filename_prefix", "scheduler", "cfg_end", "cache_interval", "emotion_cfg"]


def test_insightface_follows_comfyui_device(monkeypatch):
    """On this CPU ComfyUI InsightFace runs on the CPU. With ComfyUI on an NVIDIA GPU (a stand-in device:
    no GPU here) it asks for CUDA first when onnxruntime has it, and stays on the CPU when it does not."""
    import onnxruntime

    assert nodes_face.onnx_providers() == ("CPUExecutionProvider",)
    monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert nodes_face.onnx_providers() == ("CPUExecutionProvider",)
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert nodes_face.onnx_providers() == ("CUDAExecutionProvider", "CPUExecutionProvider")
