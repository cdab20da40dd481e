"""Checkpoint reading, strict checking and conversion (emocast_lib/checkpoint.py) on real files.

The weights are the parity set's tiny network (filled by the rule, not a trained model, checked against the
set's manifest) written to a safetensors file here; the released key set comes from the set's real-checkpoint
manifest. Hostile and damaged files are made here with torch.save.
"""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import manifest_shape, read_manifest
from emocast_lib.bench.tiny import TINY_PACK_NET, filled_net
from emocast_lib.checkpoint import (
    CONFIG_KEY,
    NOTE_KEY,
    CheckpointError,
    check_state_dict,
    convert_file,
    load_net,
    net_shapes,
    read_state_dict,
)
from emocast_lib.cli import main
from emocast_lib.config import NetConfig
from reference_config import read_net_config


def manifest_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {row["key"]: manifest_shape(row) for row in read_manifest(path)}


@pytest.fixture(scope="module")
def real_shapes(real_manifest) -> dict[str, tuple[int, ...]]:
    return manifest_shapes(real_manifest)


@pytest.fixture(scope="module")
def fill_meta(parity_config) -> dict[str, str]:
    return {"fill_seed": str(parity_config["run"]["weight_seed"])}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, tiny_net_state_dict, fill_meta) -> Path:
    path = tmp_path_factory.mktemp("tiny_net") / "tiny_net_weights.safetensors"
    save_file(tiny_net_state_dict, path, metadata=fill_meta)
    return path


@pytest.fixture(scope="module")
def tiny_sd(tiny_path) -> dict[str, torch.Tensor]:
    return load_file(tiny_path)


@pytest.fixture(scope="module")
def tiny_shapes(parity_dir) -> dict[str, tuple[int, ...]]:
    return manifest_shapes(parity_dir / "tiny_net_manifest.tsv")


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def save_pth(obj, path: Path, legacy: bool) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


# --- reading -----------------------------------------------------------------------------------------------

def test_reads_safetensors_with_metadata_and_passes_strict_check(tiny_path, tiny_sd, tiny_shapes, fill_meta):
    sd, meta = read_state_dict(tiny_path)
    assert_same(sd, tiny_sd)
    assert meta == fill_meta
    check_state_dict(sd, tiny_shapes, str(tiny_path))


def test_released_net_shapes_equal_the_real_manifest(real_shapes):
    assert net_shapes(NetConfig()) == real_shapes


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("wrap", [None, "state_dict", "module"])
def test_reads_pth_plain_and_wrapped(tmp_path, tiny_sd, legacy, wrap):
    obj = tiny_sd if wrap is None else {wrap: tiny_sd, "epoch": 7, "global_step": 1200}
    sd, meta = read_state_dict(save_pth(obj, tmp_path / "net.pth", legacy))
    assert_same(sd, tiny_sd)
    assert meta == {}


class Payload:
    """Unpickling this creates `marker`: stands in for any code a hostile checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused_without_running(tmp_path, legacy):
    marker = tmp_path / "payload_ran"
    path = save_pth({"weight": torch.ones(2), "x": Payload(marker)}, tmp_path / "net.pth", legacy)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    assert not marker.exists()
    msg = str(err.value)
    assert str(path) in msg and "refused" in msg and "other than tensors" in msg
    # Control: the payload is real, an unrestricted load does run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_pth_names_the_file(tmp_path, tiny_sd, legacy):
    data = save_pth(tiny_sd, tmp_path / "full.pth", legacy).read_bytes()
    path = tmp_path / "net.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        read_state_dict(path)
    assert str(path) in str(err.value) and "download it again" in str(err.value)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_every_truncation_of_a_small_pth_gives_checkpoint_error(tmp_path, legacy):
    """torch reports damaged files through many exception types; none may escape unwrapped."""
    buf = io.BytesIO()
    small = {"a.weight": torch.randn(4, 4), "a.bias": torch.randn(4)}
    torch.save(small, buf, _use_new_zipfile_serialization=not legacy)
    data, path = buf.getvalue(), tmp_path / "cut.pth"
    for n in range(0, len(data), 1 if legacy else 7):
        path.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match=str(path)):
            read_state_dict(path)


@pytest.mark.parametrize("keep", [lambda n: n // 2, lambda n: n - n // 1000, lambda n: 4],
                         ids=["half", "last-bytes", "header-length"])
def test_truncated_safetensors_names_the_file(tmp_path, tiny_path, keep):
    data = tiny_path.read_bytes()
    path = tmp_path / "emocast.safetensors"
    path.write_bytes(data[: keep(len(data))])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        read_state_dict(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("obj, what", [
    ([torch.ones(2)], "holds a list"),
    (torch.ones(3, 3), "holds a Tensor"),
    ({}, "holds an empty dict"),
    ({"a.weight": torch.ones(2), "step": 3, "name": "x"}, "2 of 3 entries are not"),
    ({"state_dict": {"a": 1.5}}, "1 of 1 entries are not"),
])
def test_non_state_dicts_are_rejected(tmp_path, obj, what):
    path = save_pth(obj, tmp_path / "net.pth", legacy=False)
    with pytest.raises(CheckpointError, match=what) as err:
        read_state_dict(path)
    assert str(path) in str(err.value)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(tmp_path / "net.pth")
    onnx = tmp_path / "net.onnx"
    onnx.write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"net\.onnx: unsupported file type '\.onnx'"):
        read_state_dict(onnx)


# --- strict check ------------------------------------------------------------------------------------------

def test_check_reports_missing_unexpected_and_wrong_shape(tiny_sd, tiny_shapes):
    sd = dict(tiny_sd)
    removed = "imageproj.proj.weight"
    resized = "audioproj.proj1.weight"
    del sd[removed]
    sd[resized] = torch.zeros(3, 5)
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        check_state_dict(sd, tiny_shapes, "models/emocast/odd.pth")
    first, *details = str(err.value).splitlines()
    assert first.startswith("models/emocast/odd.pth: does not match the EmoCAST network: 1 missing, 1 unexpected, "
                            "1 wrong-shape keys")
    assert "another model or another version" in first
    assert details == [f"  missing: {removed}", "  unexpected: extra.weight",
                       f"  wrong shape: {resized}: file (3, 5), expected {tiny_shapes[resized]}"]


def test_check_lists_only_the_first_few_keys(tiny_sd, real_shapes):
    real = real_shapes
    with pytest.raises(CheckpointError) as err:
        check_state_dict(tiny_sd, real, "tiny.safetensors")
    msg = str(err.value)
    n_missing = len(real.keys() - tiny_sd.keys())
    assert f": {n_missing} missing, {len(tiny_sd.keys() - real.keys())} unexpected," in msg
    assert f"... and {n_missing - 5} more" in msg
    missing_line = next(line for line in msg.splitlines() if line.startswith("  missing:"))
    assert missing_line.count(";") == 4


def aux_keys(parity_dir: Path, module: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """Shape-only (meta) tensors under the real key names of the tiny VAE / CLIP checkpoint files."""
    return {prefix + row["key"]: torch.empty(manifest_shape(row), device="meta")
            for row in read_manifest(parity_dir / "tiny_aux_manifest.tsv") if row["module"] == module}


@pytest.mark.parametrize("kind, folder", [
    ("sd", "Stable Diffusion checkpoint, not EmoCAST's net.pth; put it in models/checkpoints"),
    ("vae", "VAE, not EmoCAST's net.pth; put it in models/vae"),
    ("clip", "CLIP text encoder, not EmoCAST's net.pth; put it in models/text_encoders"),
    ("wav2vec2", "wav2vec2 audio encoder, not EmoCAST's net.pth; put it in models/audio_encoders"),
])
def test_check_recognises_foreign_checkpoints(parity_dir, real_shapes, kind, folder):
    vae, clip = aux_keys(parity_dir, "vae"), aux_keys(parity_dir, "text_encoder")
    wav2vec2 = {"feature_extractor.conv_layers.0.conv.weight": torch.empty(512, 1, 10, device="meta"),
                "encoder.layers.0.attention.q_proj.weight": torch.empty(768, 768, device="meta")}
    sd = {"vae": vae, "clip": clip, "wav2vec2": wav2vec2, "sd": {
        "model.diffusion_model.input_blocks.0.0.weight": torch.empty(320, 4, 3, 3, device="meta"),
        **{f"first_stage_model.{k}": v for k, v in vae.items()},
        **{f"cond_stage_model.transformer.{k}": v for k, v in clip.items()}}}[kind]
    with pytest.raises(CheckpointError) as err:
        check_state_dict(sd, real_shapes, f"models/emocast/{kind}.safetensors")
    first = str(err.value).splitlines()[0]
    assert first.startswith(f"models/emocast/{kind}.safetensors: does not match") and folder in first


# --- conversion --------------------------------------------------------------------------------------------

def test_fp32_round_trip_is_bit_exact(tmp_path, tiny_sd, tiny_shapes):
    src = save_pth({"state_dict": tiny_sd}, tmp_path / "net.pth", legacy=False)
    dst = tmp_path / "emocast.safetensors"
    convert_file(src, dst, "fp32", expected=tiny_shapes)
    out, meta = read_state_dict(dst)
    assert list(out) == list(tiny_sd)
    assert all(out[k].dtype == torch.float32 and torch.equal(bits(out[k]), bits(tiny_sd[k])) for k in out)
    assert meta == {"format": "pt", "dtype": "fp32", "source": "net.pth"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emocast.safetensors", "net.pth"]


@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_conversions_equal_a_cast(tmp_path, tiny_sd, fill_meta, dtype, torch_dtype):
    src = tmp_path / "net.safetensors"
    save_file({**tiny_sd, "extra.steps": torch.arange(5)}, src, metadata=fill_meta)
    dst = tmp_path / f"emocast_{dtype}.safetensors"
    convert_file(src, dst, dtype)
    out, meta = read_state_dict(dst)
    assert torch.equal(out.pop("extra.steps"), torch.arange(5))  # integer tensors are not cast
    assert list(out) == list(tiny_sd)
    assert all(out[k].dtype == torch_dtype and torch.equal(out[k], tiny_sd[k].to(torch_dtype)) for k in out)
    assert meta == {**fill_meta, "format": "pt", "dtype": dtype, "source": "net.safetensors"}


def test_failed_conversion_leaves_existing_output_untouched(tmp_path, tiny_sd, tiny_shapes):
    dst = tmp_path / "emocast.safetensors"
    dst.write_bytes(b"previous output")
    bad = save_pth({**tiny_sd, "extra.weight": torch.ones(1)}, tmp_path / "bad.pth", legacy=True)
    with pytest.raises(CheckpointError, match="1 unexpected"):
        convert_file(bad, dst, "fp16", expected=tiny_shapes, overwrite=True)
    huge = save_pth({"w": torch.tensor([1.0, 1e6])}, tmp_path / "huge.pth", legacy=False)
    with pytest.raises(CheckpointError, match=r"huge\.pth: w has values beyond the fp16 range"):
        convert_file(huge, dst, "fp16", overwrite=True)
    with pytest.raises(CheckpointError, match=f"{dst} already exists"):  # replaced only when told
        convert_file(huge, dst, "bf16")
    assert dst.read_bytes() == b"previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth", "emocast.safetensors", "huge.pth"]
    convert_file(huge, dst, "bf16", overwrite=True)  # bf16 has the fp32 range
    assert load_file(dst)["w"].dtype == torch.bfloat16


def test_conversion_refuses_the_source_and_bad_outputs(tmp_path, tiny_path):
    src = tmp_path / "net.safetensors"
    src.write_bytes(tiny_path.read_bytes())
    (tmp_path / "sub").mkdir()
    for dst in (src, tmp_path / "sub" / ".." / "net.safetensors"):
        with pytest.raises(CheckpointError, match="is the source file itself"):
            convert_file(src, dst, "fp32")
    (tmp_path / "link.safetensors").hardlink_to(src)
    with pytest.raises(CheckpointError, match="is the source file itself"):
        convert_file(src, tmp_path / "link.safetensors", "fp32")
    with pytest.raises(CheckpointError, match=r"net\.pth: the output must be a \.safetensors file"):
        convert_file(src, tmp_path / "net.pth", "fp32")
    (tmp_path / "a_file").write_bytes(b"")
    with pytest.raises(CheckpointError, match="a_file is a file, not a folder"):
        convert_file(src, tmp_path / "a_file" / "out.safetensors", "fp32")
    convert_file(src, tmp_path / "new_folder" / "out.safetensors", "fp32")  # missing folders are made
    assert src.read_bytes() == tiny_path.read_bytes()


# --- loading the network ---------------------------------------------------------------------------------

def test_load_net_with_config(parity_dir, tiny_path, tiny_sd):
    net = load_net(tiny_path, dtype=torch.float16, config=read_net_config(parity_dir / "tiny_config.json"))
    loaded = net.state_dict()
    assert loaded.keys() == tiny_sd.keys() and not net.training
    assert all(loaded[k].dtype == torch.float16 and torch.equal(loaded[k], tiny_sd[k].half()) for k in loaded)


@pytest.mark.slow
def test_load_net_takes_the_architecture_the_file_declares(tmp_path, tiny_path, caplog):
    sd = filled_net(TINY_PACK_NET).state_dict()
    path = save_pth({"state_dict": sd, CONFIG_KEY: TINY_PACK_NET.to_json(), NOTE_KEY: "not a real model"},
                    tmp_path / "net.pth", legacy=False)
    net = load_net(path)
    assert net.config == TINY_PACK_NET
    assert all(torch.equal(v, sd[k]) for k, v in net.state_dict().items())
    assert "not a real model" in caplog.text
    # The declaration survives conversion, so a converted file loads the same way.
    dst = tmp_path / "net.safetensors"
    assert main(["convert", str(path), str(dst), "--dtype", "fp32"]) == 0
    assert load_net(dst).config == TINY_PACK_NET
    # Undeclared files are the released architecture: a file of other sizes is reported against it.
    expected = len(net_shapes(NetConfig()).keys() - load_file(tiny_path).keys())
    with pytest.raises(CheckpointError, match=f"{tiny_path}: does not match the EmoCAST network: {expected} missing"):
        load_net(tiny_path)
    bad = save_pth({"state_dict": sd, CONFIG_KEY: "{not json"}, tmp_path / "bad.pth", legacy=False)
    with pytest.raises(CheckpointError, match=f"{bad}: its {CONFIG_KEY} entry is not a valid EmoCAST config"):
        load_net(bad)


# --- command line ------------------------------------------------------------------------------------------

def test_cli_convert(tmp_path, tiny_path, tiny_sd, capsys):
    dst = tmp_path / "tiny_bf16.safetensors"
    assert main(["convert", str(tiny_path), str(dst), "--dtype", "bf16", "--no-check"]) == 0
    assert f"wrote {dst}" in capsys.readouterr().out
    with safe_open(dst, "pt") as f:
        assert f.metadata()["dtype"] == "bf16" and f.get_tensor("imageproj.proj.weight").dtype == torch.bfloat16

    # Without --no-check the file is checked against the released network, which the tiny one is not.
    assert main(["convert", str(tiny_path), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tiny_path}: does not match the EmoCAST network") and "wrong-shape" in err
    assert not (tmp_path / "x.safetensors").exists()

    assert main(["convert", str(tmp_path / "nope.pth"), str(tmp_path / "y.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'nope.pth'}: no such file; check the path (models go in models/emocast)\n"

    assert main(["convert", str(tiny_path), str(tmp_path / "z.safetensors"), "--dtype", "fp8"]) == 2
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
