"""`python -m emocast_lib batch`: jobs-file parsing, and whole batches on the tiny stand-in models (FAKE
fill-rule weights, NOT EmoCAST: real weights cannot exist here), in this process and on a local Ray runtime
with two CPU workers."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import soundfile

from emocast_lib.batch import RAY_INSTALL, JobsFileError, check_outputs_distinct, read_jobs, read_record
from emocast_lib.cli import EXAMPLES, main
from emocast_lib.jobs import Segment

ROOT = Path(__file__).resolve().parents[1]
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
# Ray's runtime talks to the node's own IP address; in a network namespace of our own with only the loopback
# interface up, that address is 127.0.0.1, so the test's traffic never leaves this machine's loopback.
LOOPBACK_ONLY = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


def loopback_only_prefix() -> list[str]:
    """The command prefix that runs a child in a loopback-only network namespace (skips the test where the
    sandbox allows none: Ray must not be pointed at a real network from a test)."""
    try:
        ok = subprocess.run([*LOOPBACK_ONLY, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        pytest.skip("the Ray test runs in a loopback-only network namespace, which needs `unshare --net` and `ip` "
                    "(root or user namespaces) here")
    return LOOPBACK_ONLY
# Three jobs, the second one bad (a text file named .png): few steps and 0.7 s of speech keep them short.
JOBS = [
    {"image": "../inputs/portrait.png", "audio": "../inputs/speech.wav", "emotion": "A calm and friendly portrait.",
     "out": "out/a.mp4", "seed": 1, "steps": 2},
    {"image": "../inputs/bad.png", "audio": "../inputs/speech.wav", "emotion": "calm", "out": "out/bad.mp4"},
    {"image": "../inputs/portrait.png", "audio": "../inputs/speech.wav", "out": "out/b.mp4", "seed": 2, "steps": 2,
     "emotion": '0-0.3 s: "A calm portrait." | 0.3-0.7 s: "An angry portrait."', "weights": "lip=1.2"},
]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _jobs_file(folder: Path, jobs: list[dict] = JOBS) -> Path:
    return _write(folder / "jobs.jsonl", "".join(json.dumps(j) + "\n" for j in jobs))


def _report(jobs_file: Path) -> dict:
    return json.loads(jobs_file.with_suffix(".report.json").read_text())


def _frames(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _partials(folder: Path) -> list[Path]:
    return sorted(folder.glob("**/.*.partial"))


def _wait_for(what: str, ready, timeout: float = 300.0):
    """Poll `ready()` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = ready()
        if found:
            return found
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _running_with_partial(jobs_file: Path, line: int | None = None, pid: int | str = "*"):
    """(entry, partial file) of a job (on `line`, or any) that is sampling now: running in the report, its
    mp4 being written (by process `pid`, or any)."""
    try:
        report = _report(jobs_file)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    for entry in report["jobs"]:
        out = Path(entry["out"])
        running = entry["status"] == "running" and line in (None, entry["line"])
        partial = list(out.parent.glob(f".{out.name}.{pid}.partial")) if running else []
        if partial:
            return entry, partial[0]
    return None


# --- parsing ---------------------------------------------------------------------------------------------

def test_jsonl_lines_keep_their_numbers_and_paths_resolve_against_the_jobs_file(tmp_path: Path):
    jobs = _write(tmp_path / "sub" / "jobs.jsonl", "\n".join([
        "# comments and blank lines are skipped but counted",
        json.dumps({"image": "a.png", "audio": "/abs/a.wav", "emotion": "calm", "out": "o/a.mp4", "seed": 7,
                    "steps": 3, "cfg": 2.5, "weights": {"lip": 1.2}, "paste_back": True, "fps": 30}),
        "",
        json.dumps({"image": "b.png", "audio": "b.wav", "out": "b.mp4", "crossfade": 0.2,
                    "emotion": [{"text": "calm", "start": 0, "end": 1}, {"text": "angry", "start": 1, "end": 2}]}),
        '{"image": "c.png", "audio": "c.wav", "emotion": "calm", "out": "c.mp4", "seed": 1.5}',
        '{"image": "d.png", "audio": "d.wav", "emotion": "calm", "out": "d.mp4", "sed": 1}',
        '{"image": "e.png", "audio": "e.wav", "out": "e.mp4"}',
        '{"image": "f.png", "audio": "f.wav", "emotion": "calm", "out": "f.mp4",',
        '["not", "an", "object"]',
        json.dumps({"image": "g.png", "audio": "g.wav", "emotion": "calm", "out": "g.mp4", "crossfade": 1}),
        json.dumps({"image": "h.png", "audio": "h.wav", "emotion": "calm", "out": "h.mp4", "paste_back": "maybe"}),
    ]))
    parsed = read_jobs(jobs)
    base = tmp_path / "sub"
    assert [j.line for j in parsed] == [2, 4, 5, 6, 7, 8, 9, 10, 11]
    a, b = parsed[0].values, parsed[1].values
    assert (a["image"], a["audio"], a["out"]) == (base / "a.png", Path("/abs/a.wav"), base / "o" / "a.mp4")
    assert a == {**a, "seed": 7, "steps": 3, "cfg": 2.5, "lip_weight": 1.2, "emotion": "calm", "paste_back": True,
                 "fps": 30}
    assert "pose_weight" not in a  # a weight left out keeps the JobSpec default
    assert b["schedule"] == (Segment("calm", 0, 1), Segment("angry", 1, 2)) and b["crossfade"] == 0.2
    errors = [j.error for j in parsed[2:]]
    assert "seed" in errors[0] and "whole number" in errors[0]
    assert "unknown field" in errors[1] and "sed" in errors[1]
    assert "missing emotion" in errors[2]
    assert "not valid JSON" in errors[3]
    assert "JSON object" in errors[4]
    assert "crossfade" in errors[5] and "schedule" in errors[5]
    assert "paste_back" in errors[6] and "true or false" in errors[6]


def test_csv_with_text_schedule_weights_and_multiline_cells(tmp_path: Path):
    jobs = _write(tmp_path / "jobs.csv", "\n".join([
        "image,audio,emotion,out,seed,weights",
        'a.png,a.wav,"A calm, friendly face.",a.mp4,3,lip=1.2 pose=0.5',
        'b.png,b.wav,"0-1.5 s: ""calm"" | 1.5-3 s: angry',
        'and loud",b.mp4,,"{""face"": 0.8}"',
        "c.png,c.wav,calm,c.mp4,x,",
        "",
        'd.png,d.wav,"0-1 s: calm | then angry",d.mp4,,',
        "e.png,e.wav,calm,e.mp4,,wrist=2",
        "f.png,f.wav,calm",
    ]))
    parsed = read_jobs(jobs)
    assert [j.line for j in parsed] == [2, 3, 5, 7, 8, 9]
    a, b = parsed[0].values, parsed[1].values
    assert a["emotion"] == "A calm, friendly face." and (a["pose_weight"], a["lip_weight"], a["seed"]) == (0.5, 1.2, 3)
    assert b["schedule"] == (Segment("calm", 0, 1.5), Segment("angry\nand loud", 1.5, 3))
    assert b["face_weight"] == 0.8 and "seed" not in b
    errors = [j.error for j in parsed[2:]]
    assert errors[0].startswith("seed:")
    assert "schedule part 2" in errors[1]
    assert "weights" in errors[2] and "pose, face, lip" in errors[2]
    assert "3 cells" in errors[3]


@pytest.mark.parametrize("name, text, message", [
    ("jobs.txt", "", ".jsonl"),
    ("jobs.csv", "image,audio,emotion\n", "the header must name"),
    ("jobs.csv", "image,audio,emotion,out,seed,seed\n", "each once"),
    ("jobs.csv", "", "empty"),
    ("jobs.jsonl", "\n# nothing\n", "no jobs"),
])
def test_jobs_file_errors(tmp_path: Path, name: str, text: str, message: str):
    with pytest.raises(JobsFileError, match=message):
        read_jobs(_write(tmp_path / name, text))
    with pytest.raises(JobsFileError, match="not found"):
        read_jobs(tmp_path / "missing.jsonl")


def test_two_lines_may_not_write_one_file_nor_overwrite_an_input(tmp_path: Path):
    rows = [{"image": "a.png", "audio": "a.wav", "emotion": "calm", "out": "a.mp4"},
            {"image": "b.png", "audio": "b.wav", "emotion": "calm", "out": "./a.mp4"},
            {"image": "c.png", "audio": "c.wav", "emotion": "calm", "out": "a.wav"}]
    parsed = read_jobs(_jobs_file(tmp_path, rows))
    check_outputs_distinct(parsed)
    assert parsed[0].error == ""
    assert "also the output of line 1" in parsed[1].error
    assert "an input of line 1" in parsed[2].error


def test_ray_optional_extra_matches_its_requirements_file():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ray"]
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements-ray.txt").read_text().splitlines()]
    assert extra == [ln for ln in lines if ln]


# --- whole batches on the tiny models ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The shipped portrait, the shipped speech cut to 0.7 s (two clips of 16 frames at 25 fps) and a
    text file named bad.png."""
    folder = tmp_path_factory.mktemp("batch") / "inputs"
    folder.mkdir()
    (folder / "portrait.png").write_bytes((EXAMPLES / "emocast_portrait.png").read_bytes())
    wave, rate = soundfile.read(EXAMPLES / "emocast_speech.wav", dtype="float32")
    soundfile.write(folder / "speech.wav", wave[: int(0.7 * rate)], rate)
    (folder / "bad.png").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def embedded(tiny_models: Path, inputs: Path) -> dict:
    """The three jobs run in this process: the reference for the other tests."""
    jobs = _jobs_file(inputs.parent / "embedded")
    started = time.monotonic()
    code = main(["batch", str(jobs), "--models", str(tiny_models), "--threads", "1"])
    return {"code": code, "jobs": jobs, "report": _report(jobs), "seconds": time.monotonic() - started}


@pytest.mark.slow
def test_embedded_batch_makes_the_good_videos_and_records_the_bad_line(embedded: dict):
    out = embedded["jobs"].parent / "out"
    assert embedded["code"] == 1  # a job failed
    assert sorted(p.name for p in out.iterdir()) == ["a.mp4", "b.mp4"]  # no half or temporary file
    jobs = {j["line"]: j for j in embedded["report"]["jobs"]}
    assert jobs[2]["status"] == "invalid" and "bad.png" in jobs[2]["error"] and "image" in jobs[2]["error"]
    for line, name in ((1, "a.mp4"), (3, "b.mp4")):
        assert jobs[line]["status"] == "done" and jobs[line]["error"] is None and jobs[line]["seconds"] > 0
        assert jobs[line]["worker"].startswith("local@") and jobs[line]["out"] == str(out / name)
        assert len(_frames(out / name)) == 18  # 0.7 s at 25 fps
    assert read_record(out / "a.mp4")["seed"] == 1 and read_record(out / "b.mp4")["lip_weight"] == 1.2
    assert embedded["report"]["summary"] == {**embedded["report"]["summary"], "done": 2, "invalid": 1, "failed": 0}


@pytest.mark.slow
def test_rerun_does_no_work(embedded: dict, tiny_models: Path, capsys):
    out = embedded["jobs"].parent / "out"
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.iterdir()}
    capsys.readouterr()
    assert main(["batch", str(embedded["jobs"]), "--models", str(tiny_models)]) == 1  # the bad line is still bad
    err = capsys.readouterr().err
    assert "jobs.jsonl:2: image:" in err and "loading the models" not in err
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.iterdir()} == before
    report = _report(embedded["jobs"])
    assert [j["status"] for j in report["jobs"]] == ["skipped", "invalid", "skipped"]


@pytest.mark.slow
def test_killed_or_interrupted_batch_leaves_no_half_file_and_the_next_run_completes_the_rest(
        tiny_models: Path, inputs: Path, embedded: dict):
    folder = inputs.parent / "killed"
    jobs = _jobs_file(folder, [JOBS[0], JOBS[2]])
    out = folder / "out"
    cmd = [sys.executable, "-m", "emocast_lib", "batch", str(jobs), "--models", str(tiny_models), "--threads", "1"]

    def run_until_line_2_samples(sig: int, log: Path) -> int:
        with open(log, "w") as sink:
            child = subprocess.Popen(cmd, cwd=ROOT, env=CHILD_ENV, stdout=sink, stderr=subprocess.STDOUT)
            try:
                _wait_for("line 2 to be writing its video", lambda: _running_with_partial(jobs, 2, child.pid))
                child.send_signal(sig)
                return child.wait(timeout=120)
            finally:
                child.kill()

    # SIGKILL: the first video is complete, the second was being written; nothing under its final name.
    assert run_until_line_2_samples(signal.SIGKILL, folder / "kill.log") == -signal.SIGKILL
    assert (out / "a.mp4").is_file() and not (out / "b.mp4").exists()
    assert _report(jobs)["jobs"][1]["status"] == "running"  # the report is honest about the killed run
    # Ctrl-C: the running job stops at its next step; no half file, the killed run's temporary file is gone too.
    assert run_until_line_2_samples(signal.SIGINT, folder / "interrupt.log") == 130
    assert sorted(p.name for p in out.iterdir()) == ["a.mp4"]
    assert [j["status"] for j in _report(jobs)["jobs"]] == ["skipped", "cancelled"]
    # The next run does the rest, and only the rest.
    assert main(["batch", str(jobs), "--models", str(tiny_models), "--threads", "1"]) == 0
    assert [j["status"] for j in _report(jobs)["jobs"]] == ["skipped", "done"]
    assert sorted(p.name for p in out.iterdir()) == ["a.mp4", "b.mp4"] and not _partials(folder)
    reference = embedded["jobs"].parent / "out"
    for name in ("a.mp4", "b.mp4"):  # the same videos as one uninterrupted run
        assert np.array_equal(_frames(out / name), _frames(reference / name))


@pytest.mark.slow
@pytest.mark.ray
def test_ray_workers_make_the_same_videos_and_a_killed_worker_job_is_retried(tiny_models: Path, inputs: Path,
                                                                           embedded: dict):
    pytest.importorskip("ray", reason="Ray is optional: pip install -r requirements-ray.txt")
    folder = inputs.parent / "ray"
    jobs = _jobs_file(folder)
    # A local runtime with 2 CPUs: 2 workers of 1 thread each (no dashboard: that is the default).
    cmd = [*loopback_only_prefix(), sys.executable, "-m", "emocast_lib", "batch", str(jobs), "--models",
           str(tiny_models), "--ray", "--workers", "2", "--threads", "1"]
    log = folder / "driver.log"
    with open(log, "w") as sink:
        driver = subprocess.Popen(cmd, cwd=ROOT, env=CHILD_ENV, stdout=sink, stderr=subprocess.STDOUT)
        try:
            entry, partial = _wait_for("a Ray worker to be writing a video", lambda: _running_with_partial(jobs))
            pid = int(re.fullmatch(r"w\d+@.+:(\d+)", entry["worker"]).group(1))
            assert partial.name.endswith(f".{pid}.partial")  # that worker writes it
            os.kill(pid, signal.SIGKILL)
            code = driver.wait(timeout=600)
        finally:
            driver.kill()
    assert code == 1, log.read_text()[-3000:]
    report = _report(jobs)
    assert report["mode"] == "ray"
    jobs_by_line = {j["line"]: j for j in report["jobs"]}
    assert jobs_by_line[2]["status"] == "invalid"
    killed = jobs_by_line[entry["line"]]
    assert killed["status"] == "done" and len(killed["attempts"]) == 2
    first, second = killed["attempts"]
    assert first["status"] == "failed" and "died" in first["error"] and first["worker"] == entry["worker"]
    assert second["status"] == "done" and second["worker"] != first["worker"]
    out, reference = folder / "out", embedded["jobs"].parent / "out"
    assert sorted(p.name for p in out.iterdir()) == ["a.mp4", "b.mp4"]
    for name in ("a.mp4", "b.mp4"):  # bit-identical to the embedded run for the same seeds
        assert np.array_equal(_frames(out / name), _frames(reference / name)), name


@pytest.mark.ray
def test_workers_fit_the_nodes():
    """Ray's node records -> workers that a node can hold; a request no node can satisfy is refused."""
    pytest.importorskip("ray", reason="Ray is optional: pip install -r requirements-ray.txt")
    from emocast_lib.ray_pool import RayStartError, fit

    two_cpus = [{"Alive": True, "Resources": {"CPU": 2.0, "memory": 1e10}}, {"Alive": False, "Resources": {"CPU": 64}}]
    plan = fit(two_cpus, "auto", None, None, jobs=5)
    assert (plan.count, plan.resources, plan.threads) == (1, {"num_cpus": 2}, 2)  # 4 threads would never be placed
    assert fit(two_cpus, "cpu", 2, 1, jobs=5).count == 2 and fit(two_cpus, "cpu", None, 1, jobs=1).count == 1
    with pytest.raises(RayStartError, match="--threads 3: no Ray node has that many CPUs .the largest has 2.; use "
                                            "--threads 2 or fewer"):
        fit(two_cpus, "auto", None, 3, jobs=5)
    gpus = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0}},
            {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}]
    assert (fit(gpus, "auto", None, None, 9).count, fit(gpus, "auto", None, None, 9).resources) == \
        (3, {"num_gpus": 1, "num_cpus": 1})
    assert fit(gpus, "cpu", None, None, 9).resources == {"num_cpus": 4}  # --device cpu: no GPU asked for


@pytest.mark.slow
@pytest.mark.ray
def test_ray_with_default_settings_runs_on_this_machine(tiny_models: Path, inputs: Path):
    """`--ray` and nothing else completes on any machine (here 2 CPUs); a --threads no node has is one line."""
    pytest.importorskip("ray", reason="Ray is optional: pip install -r requirements-ray.txt")
    jobs = _jobs_file(inputs.parent / "ray_defaults")
    cmd = [*loopback_only_prefix(), sys.executable, "-m", "emocast_lib", "batch", str(jobs), "--models",
           str(tiny_models), "--ray"]
    proc = subprocess.run(cmd, cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert [j["status"] for j in _report(jobs)["jobs"]] == ["done", "invalid", "done"]
    for name in ("a.mp4", "b.mp4"):  # 2 threads per worker here: the same video up to float rounding, not bitwise
        assert len(_frames(jobs.parent / "out" / name)) == 18
    proc = subprocess.run([*cmd, "--redo", "--threads", "4096"], cwd=ROOT, env=CHILD_ENV, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 2
    assert re.fullmatch(r"error: --threads 4096: no Ray node has that many CPUs \(the largest has (\d+)\); use "
                        r"--threads \1 or fewer", proc.stderr.strip().splitlines()[-1]), proc.stderr[-2000:]


def test_ray_absent_says_how_to_install_it(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    jobs = _jobs_file(tmp_path, JOBS[:1])
    assert main(["batch", str(jobs), "--ray"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {RAY_INSTALL}"


@pytest.mark.slow
def test_strict_runs_nothing_and_files_not_made_here_are_kept(tiny_models: Path, inputs: Path, tmp_path: Path,
                                                             capsys):
    foreign = _write(tmp_path / "out" / "a.mp4", "someone's video")
    jobs = _jobs_file(tmp_path, [{**JOBS[0], "image": str(inputs / "portrait.png"),
                                  "audio": str(inputs / "speech.wav")},
                                 {**JOBS[1], "image": str(inputs / "bad.png"), "audio": str(inputs / "speech.wav")}])
    assert main(["batch", str(jobs), "--models", str(tiny_models), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "jobs.jsonl:1: out:" in err and "--redo" in err and "jobs.jsonl:2: image:" in err
    assert "--strict: 2 bad line(s), nothing was run" in err and "loading the models" not in err
    assert foreign.read_text() == "someone's video" and sorted(p.name for p in foreign.parent.iterdir()) == ["a.mp4"]
