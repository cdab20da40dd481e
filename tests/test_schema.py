"""One declaration per job value: the command line, the batch reader and every node widget take their
options, ranges and defaults from the job schema (emocast_lib/jobs/schema.py), and each job decodes its
photo and audio and finds its face once."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import soundfile

from emocast_lib import audio as audio_lib
from emocast_lib import photo as photo_lib
from emocast_lib.batch import COLUMNS, OPTIONAL, REQUIRED, WEIGHTS, read_jobs
from emocast_lib.cli import EXAMPLES, FILE_DEFAULTS, build_parser, main
from emocast_lib.face import LandmarkDetector
from emocast_lib.jobs import JobSpec, ModelSettings, Segment, limits, option, widget
from emocast_lib.jobs.schema import choices, extra, fields, kind

ROOT = Path(__file__).resolve().parents[1]
NUMBERS = [name for name, info in fields(JobSpec).items() if kind(info) in (int, float)]


def _beyond(name: str) -> int | float:
    """A value just above the field's range, of the field's type."""
    high = limits(name)[1]
    return high + 1 if isinstance(high, int) else high + 1.0


def _generate_actions() -> dict[str, object]:
    sub = build_parser()._subparsers._group_actions[0].choices  # argparse's own record of the options
    return {a.dest: a for a in sub["generate"]._actions}


def test_every_field_is_a_cli_option_with_the_schema_default_and_choices():
    actions = _generate_actions()
    for model in (JobSpec, ModelSettings):
        for name, info in fields(model).items():
            if not extra(info, "cli"):
                continue
            action = actions[name]
            assert option(name) in action.option_strings, name
            if name not in ("schedule", "speakers"):  # repeatable options collect into a list
                assert action.default == FILE_DEFAULTS.get(name, info.default), name
            assert tuple(action.choices or ()) == (choices(info) or ()), name
            assert action.help == info.description, name


@pytest.mark.parametrize("name", NUMBERS)
def test_cli_ranges_are_the_schema_ranges(name, capsys):
    low, high = limits(name)
    assert main(["generate", option(name), str(_beyond(name))]) == 2
    err = capsys.readouterr().err
    assert f"error: {option(name)}: {_beyond(name)} is out of range; use a value from {low} to {high}" in err


def test_batch_columns_are_the_schema_fields(tmp_path: Path):
    batch_fields = {name for name, info in fields(JobSpec).items() if extra(info, "batch")}
    assert set(REQUIRED) | set(COLUMNS) | set(WEIGHTS.values()) == batch_fields
    assert set(OPTIONAL) == {"weights", *COLUMNS}
    base = {"image": "a.png", "audio": "a.wav", "emotion": "calm", "out": "a.mp4"}
    schedule = [{"text": "calm", "start": 0, "end": 1}]  # crossfade belongs to a schedule
    rows = [{**base, name: _beyond(name), **({"emotion": schedule} if name == "crossfade" else {})}
            for name in NUMBERS if name in COLUMNS]
    rows += [{**base, "weights": {short: _beyond(name)}} for short, name in WEIGHTS.items()]
    rows += [{**base, "crop": "bogus"}, base]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parsed = read_jobs(jobs)
    names = [n for n in NUMBERS if n in COLUMNS] + list(WEIGHTS.values())
    for line, name in zip(parsed, names):
        low, high = limits(name)
        assert line.error == f"{name}: {_beyond(name)} is out of range; use a value from {low} to {high}"
    assert parsed[-2].error == "crop: 'bogus' is not one of " + ", ".join(choices(fields(JobSpec)["crop"]))
    spec = JobSpec(**parsed[-1].values)  # a line without the optional columns: the schema's defaults
    assert all(getattr(spec, n) == info.default for n, info in fields(JobSpec).items() if n not in REQUIRED)


# Node widget -> (schema model, field): where a widget stands for a job value.
WIDGETS = {("EmoCASTAudioEncode", "fps"): (JobSpec, "fps"),
           ("EmoCASTAudioEncode", "clip_length"): (JobSpec, "clip_length"),
           ("EmoCASTFaceAnalysis", "expand_ratio"): (JobSpec, "expand_ratio"),
           ("EmoCASTCropPortrait", "scale"): (JobSpec, "crop_scale"),
           ("EmoCASTEmotionEncode", "text"): (JobSpec, "emotion"),
           ("EmoCASTEmotionSchedule", "crossfade"): (JobSpec, "crossfade"),
           ("EmoCASTModelLoader", "precision"): (ModelSettings, "precision"),
           **{("EmoCASTEmotionSchedule", f"strength_{i}"): (Segment, "strength") for i in range(1, 5)},
           **{(node, name): (JobSpec, name) for node in ("EmoCASTSampler", "EmoCASTSamplerToVideo")
              for name in ("cfg", "seed", "pose_weight", "face_weight", "lip_weight", "scheduler", "cfg_end",
                           "cache_interval")}}


@pytest.mark.comfy
def test_every_node_widget_takes_range_and_default_from_the_schema():
    comfy_dir, venv = os.environ.get("COMFY_DIR"), os.environ.get("COMFY_VENV")
    python = Path(venv or "", "bin", "python")
    if not (comfy_dir and python.is_file()):
        pytest.skip("the nodes' schema objects need ComfyUI: set COMFY_DIR and COMFY_VENV")
    proc = subprocess.run([str(python), "tests/schema_widgets.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT / "tests")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    nodes = json.loads(proc.stdout.strip().splitlines()[-1])
    for (node, name), (model, field) in WIDGETS.items():
        assert nodes[node][name] == widget(field, model), (node, name)
    for node in ("EmoCASTSampler", "EmoCASTSamplerToVideo"):  # 0 steps: the checkpoint's count, else the range
        assert nodes[node]["steps"]["max"] == limits("steps")[1] and nodes[node]["steps"]["min"] == 0
        # emotion_cfg -1: unset (the schema's None, the same as cfg), else the range
        assert nodes[node]["emotion_cfg"] == {"default": -1.0, "min": -1.0, "max": limits("emotion_cfg")[1]}
    seconds = {"min": limits("start", Segment)[0], "max": limits("start", Segment)[1]}
    schedule = nodes["EmoCASTEmotionSchedule"]
    assert [{k: w[k] for k in seconds} for i, w in schedule.items() if i.startswith(("start_", "end_"))] == \
        [seconds] * sum(i.startswith(("start_", "end_")) for i in schedule)


# --- each input decoded once ---------------------------------------------------------------------------

@pytest.fixture()
def calls(monkeypatch) -> dict[str, list]:
    """Spies on the real photo decoder, audio decoder and face landmarker: the paths each was called on."""
    seen: dict[str, list] = {"photo": [], "audio": [], "face": [], "landmarker": []}
    load_photo, load_audio, detect, init = (photo_lib.load_photo, audio_lib.load_audio_file,
                                            LandmarkDetector.__call__, LandmarkDetector.__init__)

    def spy_photo(path, *a, **k):
        seen["photo"].append(Path(path))
        return load_photo(path, *a, **k)

    def spy_audio(path, *a, **k):
        seen["audio"].append(Path(path))
        return load_audio(path, *a, **k)

    def spy_detect(self, rgb):
        seen["face"].append(rgb.shape)
        return detect(self, rgb)

    def spy_init(self, task):
        seen["landmarker"].append(Path(task))
        return init(self, task)

    monkeypatch.setattr(photo_lib, "load_photo", spy_photo)
    monkeypatch.setattr(audio_lib, "load_audio_file", spy_audio)
    monkeypatch.setattr(LandmarkDetector, "__call__", spy_detect)
    monkeypatch.setattr(LandmarkDetector, "__init__", spy_init)
    return seen


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    """0.3 s of the shipped speech: one clip."""
    wave, rate = soundfile.read(EXAMPLES / "emocast_speech.wav", dtype="float32")
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    soundfile.write(path, wave[: int(0.3 * rate)], rate)
    return path


@pytest.mark.slow
def test_a_cli_job_decodes_its_photo_and_audio_and_finds_its_face_once(calls, tiny_models, speech, tmp_path):
    out = tmp_path / "o.mp4"
    assert main(["generate", "--models", str(tiny_models), "--audio", str(speech), "--steps", "1", "--paste-back",
                 "--out", str(out)]) == 0
    assert out.is_file()
    assert calls["photo"] == [FILE_DEFAULTS["image"]] and calls["audio"] == [speech]
    assert len(calls["face"]) == 1 and len(calls["landmarker"]) == 1


@pytest.mark.slow
def test_a_batch_sharing_a_photo_and_an_audio_decodes_each_once(calls, tiny_models, speech, tmp_path):
    photo = tmp_path / "portrait.png"
    photo.write_bytes(FILE_DEFAULTS["image"].read_bytes())
    jobs = tmp_path / "jobs.jsonl"
    rows = [{"image": "portrait.png", "audio": str(speech), "emotion": emotion, "out": f"out/{i}.mp4", "steps": 1,
             "seed": i} for i, emotion in enumerate(["A calm portrait.", "An angry portrait.", "A happy portrait."])]
    jobs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["batch", str(jobs), "--models", str(tiny_models), "--threads", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.mp4", "1.mp4", "2.mp4"]
    assert calls["photo"] == [photo] and calls["audio"] == [speech]
    assert len(calls["face"]) == 1 and len(calls["landmarker"]) == 1
