"""The fixture sets: the in-repo copies stay small, and the parity and preprocessing tests hold for any set
of the documented form, not only for the one they were written against.

`test_tests_pass_on_a_varied_copy` reruns those tests (a child pytest) on a copy of the selected sets in
which everything that can change without recomputing a reference output is changed: the face and speech
cases are renamed (no `astronaut`, no `speech_a_*`) so that they sort in the reverse order, the parity set's
folder has another name, the manifests' rows are shuffled and the JSON files' keys reversed. Seeds, prompts
and sizes cannot be varied honestly (the expected tensors would have to be recomputed with the reference
implementation, which is not here); the tests read all of them from the set instead of repeating them.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES, PARITY_VAR, PREPROCESS_VAR, ROOT

FIXTURE_TESTS = ["test_parity_network.py", "test_parity_text_encoder.py", "test_checkpoint.py",
                 "test_preprocess_audio.py", "test_preprocess_face_masks.py", "test_preprocess_face_models.py"]
BUDGET_BYTES = 25_000_000


def test_in_repo_sets_fit_the_budget():
    size = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    assert size <= BUDGET_BYTES, f"tests/fixtures holds {size / 1e6:.1f} MB (budget {BUDGET_BYTES / 1e6:.0f} MB)"


def _reversed_names(names: list[str], prefix: str) -> dict[str, str]:
    """Old -> new names that sort in the opposite order and share nothing with the old ones."""
    ordered = sorted(names)
    return {old: f"{prefix}{len(ordered) - i:02d}" for i, old in enumerate(ordered)}


def _shuffle_rows(path: Path, rng: random.Random) -> None:
    header, *rows = path.read_text().splitlines()
    rng.shuffle(rows)
    path.write_text("\n".join([header, *rows]) + "\n")


def _reverse_keys(path: Path) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(dict(reversed(list(data.items()))), indent=1))


def vary_parity(tiny: Path, out: Path) -> Path:
    """Copy a parity set (the folder with tiny_config.json and its `real_config/` sibling) under another name."""
    rng = random.Random(0)
    shutil.copytree(tiny.parent / "real_config", out / "real_config")
    varied = shutil.copytree(tiny, out / "other set")
    for manifest in [*varied.glob("*.tsv"), *(out / "real_config").glob("*.tsv")]:
        _shuffle_rows(manifest, rng)
    for config in varied.glob("*.json"):
        _reverse_keys(config)
    return varied


def vary_preprocess(root: Path, out: Path) -> Path:
    """Copy a preprocessing set with its face cases and speech cases renamed into the reverse order."""
    varied = shutil.copytree(root, out / "preprocess")
    faces = [d.name for d in (varied / "faces").iterdir() if (d / "masks.safetensors").is_file()]
    renamed = _reversed_names(faces, "case")
    for old, new in renamed.items():
        (varied / "faces" / old).rename(varied / "faces" / new)
    audio = varied / "audio"
    stems = [p.stem for p in audio.glob("*.wav") if p.with_suffix(".safetensors").is_file()]
    speech = _reversed_names(stems, "utterance")
    for old in sorted(stems, key=len, reverse=True):  # a longer stem first, should one prefix another
        for path in list(audio.iterdir()):
            if path.is_file() and path.name.startswith((old + ".", old + "_")):
                path.rename(audio / (speech[old] + path.name[len(old):]))
    return varied


@pytest.mark.slow
def test_tests_pass_on_a_varied_copy(parity_dir: Path, preprocess_dir: Path, tmp_path: Path):
    parity = vary_parity(parity_dir, tmp_path / "parity")
    preprocess = vary_preprocess(preprocess_dir, tmp_path)
    for group, pattern in (("faces", "*/masks.safetensors"), ("audio", "*.wav")):
        before, after = ([p.relative_to(s / group).parts[0] for p in sorted((s / group).glob(pattern))]
                         for s in (preprocess_dir, preprocess))
        assert len(after) == len(before) and not set(after) & set(before), (group, before, after)
    env = {**os.environ, PARITY_VAR: str(parity), PREPROCESS_VAR: str(preprocess), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(f"tests/{t}" for t in FIXTURE_TESTS)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    assert proc.returncode == 0, f"on the varied copy: {summary}\n{proc.stdout[-4000:]}"
    assert " passed" in summary, summary
