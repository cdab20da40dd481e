"""`python -m emocast_lib batch`: jobs-file parsing, and the batch on the tiny stand-in models (FAKE
weights made by the fill rule; real weights cannot exist here), in this process and on a local Ray runtime."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from emocast_lib.batch import JobsFileError, Segment, check_outputs_distinct, read_jobs


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_lines_keep_their_numbers_and_paths_resolve_against_the_jobs_file(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    jobs = _write(tmp_path / "sub" / "jobs.jsonl", "\n".join([
        "# comments and blank lines are skipped but counted",
        json.dumps({"image": "a.png", "audio": "/abs/a.wav", "emotion": "calm", "out": "o/a.mp4", "seed": 7,
                    "steps": 3, "cfg": 2.5, "weights": {"lip": 1.2}}),
        "",
        json.dumps({"image": "b.png", "audio": "b.wav", "out": "b.mp4", "crossfade": 0.2,
                    "emotion": [{"text": "calm", "start": 0, "end": 1}, {"text": "angry", "start": 1, "end": 2}]}),
        '{"image": "c.png", "audio": "c.wav", "emotion": "calm", "out": "c.mp4", "seed": 1.5}',
        '{"image": "d.png", "audio": "d.wav", "emotion": "calm", "out": "d.mp4", "sed": 1}',
        '{"image": "e.png", "audio": "e.wav", "out": "e.mp4"}',
        '{"image": "f.png", "audio": "f.wav", "emotion": "calm", "out": "f.mp4",',
        '["not", "an", "object"]',
        json.dumps({"image": "g.png", "audio": "g.wav", "emotion": "calm", "out": "g.mp4", "crossfade": 1}),
    ]))
    parsed = read_jobs(jobs)
    base = tmp_path / "sub"
    assert [j.line for j in parsed] == [2, 4, 5, 6, 7, 8, 9, 10]
    a, b = parsed[0].values, parsed[1].values
    assert (a["image"], a["audio"], a["out"]) == (base / "a.png", Path("/abs/a.wav"), base / "o" / "a.mp4")
    assert (a["seed"], a["steps"], a["cfg"], a["weights"], a["emotion"]) == (7, 3, 2.5, (1.0, 1.0, 1.2), "calm")
    assert b["emotion"] == [Segment("calm", 0, 1), Segment("angry", 1, 2)] and b["crossfade"] == 0.2
    errors = [j.error for j in parsed[2:]]
    assert "seed" in errors[0] and "whole number" in errors[0]
    assert "unknown field" in errors[1] and "sed" in errors[1]
    assert "missing emotion" in errors[2]
    assert "not valid JSON" in errors[3]
    assert "JSON object" in errors[4]
    assert "crossfade" in errors[5] and "schedule" in errors[5]


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
    assert a["emotion"] == "A calm, friendly face." and a["weights"] == (0.5, 1.0, 1.2) and a["seed"] == 3
    assert b["emotion"] == [Segment("calm", 0, 1.5), Segment("angry\nand loud", 1.5, 3)]
    assert b["weights"] == (1.0, 0.8, 1.0) and "seed" not in b
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
    parsed = read_jobs(_write(tmp_path / "jobs.jsonl", "\n".join(map(json.dumps, rows))))
    check_outputs_distinct(parsed)
    assert parsed[0].error == ""
    assert "also the output of line 1" in parsed[1].error
    assert "an input of line 1" in parsed[2].error
