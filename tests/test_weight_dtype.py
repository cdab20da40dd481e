"""fp8 weight storage in the library (`load_net(weight_dtype=...)`, `CastOps`) and in `convert`, on the CPU.

The linear/conv weights are held in an 8-bit float format and cast to the compute dtype in every call; the
norms, biases and buffers keep that dtype. Checked on the tiny network (fill rule) and, for the storage and
one block's output, at the released widths.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_run import run_tiny

from emocast_lib.bench.fill import fill_tensor
from emocast_lib.bench.tiny import TINY_NET, TINY_SEED, fill_module, filled_net, filled_vae
from emocast_lib.checkpoint import (
    CONFIG_KEY,
    CheckpointError,
    assign_weights,
    convert_file,
    load_net,
    net_shapes,
    read_state_dict,
)
from emocast_lib.config import STORAGE_FORMATS, NetConfig
from emocast_lib.models import EmoCASTNet
from emocast_lib.models.blocks import ResnetBlock, SpatialTransformer
from emocast_lib.models.ops import CastConv2d, CastLinear, CastOps, large_weights, own_weights
from emocast_lib.pipeline import diffusers_vae

FORMATS = list(STORAGE_FORMATS)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    """The fill rule's tiny network as a float32 .safetensors declaring its architecture."""
    path = tmp_path_factory.mktemp("weight_dtype") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in filled_net().state_dict().items()}, path,
              metadata={CONFIG_KEY: TINY_NET.to_json()})
    return path


@pytest.fixture(scope="module")
def vae():
    return diffusers_vae(filled_vae())


def one_step(net: EmoCASTNet, vae, **compute) -> tuple[torch.Tensor, torch.Tensor]:
    """One clip of one step (longer runs: the random network amplifies rounding until any two runs differ as
    much as two unrelated videos, test_precision.py)."""
    return run_tiny(net, vae, clips=1, steps=1, **compute)


def deviation(ours: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """Frames' mean |difference| (pixels in 0..1) and the latents' RMS difference relative to their RMS."""
    rel = (ours[0] - ref[0]).double().pow(2).mean().sqrt() / ref[0].double().pow(2).mean().sqrt()
    return (ours[1] - ref[1]).abs().mean().item(), rel.item()


def nbytes(net: torch.nn.Module, keys) -> int:
    state = net.state_dict()
    return sum(state[k].nbytes for k in keys)


def test_large_weights_are_the_linear_and_conv_weights():
    """Independently of the module types: the 2-D and 4-D tensors of the state dict, less the motion modules'
    sinusoid tables (buffers)."""
    net = EmoCASTNet(TINY_NET, device="meta")
    expected = {k for k, v in net.state_dict().items() if v.dim() in (2, 4) and not k.endswith("pos_encoder.pe")}
    assert large_weights(net) == expected


@pytest.mark.parametrize("fmt", FORMATS)
def test_fp8_load_stores_the_large_weights_in_fp8(tiny_file, fmt):
    half = load_net(tiny_file, dtype=torch.float16)
    net = load_net(tiny_file, dtype=torch.float16, weight_dtype=fmt)
    fp32 = read_state_dict(tiny_file)[0]
    large = large_weights(net)
    state = net.state_dict()
    assert {state[k].dtype for k in large} == {STORAGE_FORMATS[fmt]}
    assert all(torch.equal(state[k].view(torch.uint8), fp32[k].to(STORAGE_FORMATS[fmt]).view(torch.uint8))
               for k in large)  # one rounding, from the file's fp32
    half_state = half.state_dict()
    for k, v in state.items():  # the rest as the fp16 load has it
        if k not in large:
            assert v.dtype == half_state[k].dtype and torch.equal(v, half_state[k]), k
    assert nbytes(net, large) * 2 == nbytes(half, large)
    layers = [m for m in net.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert layers and all(isinstance(m, (CastLinear, CastConv2d)) and own_weights(m) is None for m in layers)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fp8_network_computes_like_fp32_with_rounded_weights(tiny_file, vae, fmt):
    """Storing in fp8 and casting per call is exactly rounding the weights once: the fp32 network holding the
    rounded weights gives the same video (measured: latents 8e-5 apart, from the fast paths a casting layer
    does not take, e.g. the small-grid GEMM convolution)."""
    rounded = load_net(tiny_file)
    state = rounded.state_dict()
    for k in large_weights(rounded):
        state[k].copy_(state[k].to(STORAGE_FORMATS[fmt]).float())
    expected = one_step(rounded, vae)
    got = one_step(load_net(tiny_file, weight_dtype=fmt), vae)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)


# Measured on this CPU, one clip of one step at 64 px (frames' mean |difference|, latents' relative RMS):
#   fp8_e4m3fn: 0.0563, 0.218 (with bf16 or fp16 computation: 0.0565/0.0564, 0.219/0.219)
#   fp8_e5m2:   0.0935, 0.428 (bf16/fp16: 0.0937/0.0935, 0.428/0.428)
#   another initial noise (an unrelated video): about 0.25 and 1.0; bf16 alone: 0.0096, 0.038; fp16: 0.0011, 0.005
# The deviation is the weights' rounding (3 mantissa bits for e4m3fn, 2 for e5m2: 16x and 32x bf16's step), the
# same on every CPU, so the bounds are 1.5x the measured values; each also stays far from an unrelated video's.
@pytest.mark.parametrize("fmt,frames_tol,latents_tol", [("fp8_e4m3fn", 0.085, 0.33), ("fp8_e5m2", 0.14, 0.64)])
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp8_video_close_to_fp32(tiny_file, vae, fmt, frames_tol, latents_tol, compute):
    ref = one_step(load_net(tiny_file), vae)
    net = load_net(tiny_file, dtype=compute, weight_dtype=fmt)
    seen = set()
    hooks = [m.register_forward_hook(lambda m, a, out: seen.add(out.dtype) if isinstance(out, torch.Tensor) else None)
             for m in net.modules()]
    got = one_step(net, vae)  # the pipeline's default dtype: the norms', not the fp8 weights'
    for h in hooks:
        h.remove()
    assert seen == {compute}
    frames, latents = deviation(got, ref)
    assert frames <= frames_tol and latents <= latents_tol, (frames, latents)
    g = torch.Generator().manual_seed(99)
    unrelated = one_step(load_net(tiny_file), vae, noise=lambda clip: torch.randn(1, 4, 4, 8, 8, generator=g))
    assert frames < deviation(unrelated, ref)[0] / 2 and latents < deviation(unrelated, ref)[1] / 2


def test_fp8_needs_casting_layers_and_a_known_format(tiny_file):
    from emocast_lib.models.ops import TorchOps

    with pytest.raises(ValueError, match="need casting layers"):
        load_net(tiny_file, weight_dtype="fp8_e4m3fn", operations=TorchOps)
    with pytest.raises(ValueError, match="weight_dtype must be one of default, fp8_e4m3fn, fp8_e5m2"):
        load_net(tiny_file, weight_dtype="fp8_e4m3fn_fast")  # ComfyUI's fp8 matmul choice, not a format


def test_fp8_load_refuses_weights_beyond_the_format(tmp_path, tiny_file):
    """Beyond +-448 fp8_e4m3fn would clip a weight without a word: refused, with the formats that hold it."""
    sd = read_state_dict(tiny_file)[0]
    key = sorted(large_weights(EmoCASTNet(TINY_NET, device="meta")))[0]
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = 500.0
    path = tmp_path / "big.safetensors"
    save_file(sd, path, metadata={CONFIG_KEY: TINY_NET.to_json()})
    with pytest.raises(CheckpointError, match=rf"big\.safetensors: {key} \(weight_dtype fp8_e4m3fn\) has values "
                                              r"beyond the fp8_e4m3fn range \(\+-448\); choose fp16 or bf16 or fp32 or "
                                              "fp8_e5m2 instead"):
        load_net(path, weight_dtype="fp8_e4m3fn")
    assert load_net(path, weight_dtype="fp8_e5m2").state_dict()[key].view(-1)[0].item() == 512.0  # rounded, kept


def safetensors_dtypes(path: Path) -> dict[str, str]:
    with path.open("rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


@pytest.mark.parametrize("fmt,tag", [("fp8_e4m3fn", "F8_E4M3"), ("fp8_e5m2", "F8_E5M2")])
def test_convert_writes_fp8_and_it_loads_back_strictly(tmp_path, tiny_file, fmt, tag):
    dst = tmp_path / f"tiny_{fmt}.safetensors"
    convert_file(tiny_file, dst, fmt, expected=net_shapes(TINY_NET))
    large = large_weights(EmoCASTNet(TINY_NET, device="meta"))
    dtypes = safetensors_dtypes(dst)
    assert {dtypes[k] for k in large} == {tag} and {v for k, v in dtypes.items() if k not in large} == {"F32"}
    sd, meta = read_state_dict(dst)
    assert meta[CONFIG_KEY] == TINY_NET.to_json() and meta["dtype"] == fmt
    src = read_state_dict(tiny_file)[0]
    assert sum(sd[k].nbytes for k in large) * 4 == sum(src[k].nbytes for k in large)
    assert all(torch.equal(sd[k], src[k]) for k in sd if k not in large)
    # strict loads: as fp8 (the same tensors as converting at load time), and widened to fp32
    a = load_net(dst, dtype=torch.float16, weight_dtype=fmt).state_dict()
    b = load_net(tiny_file, dtype=torch.float16, weight_dtype=fmt).state_dict()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    wide = load_net(dst).state_dict()
    assert all(wide[k].dtype == torch.float32 and torch.equal(wide[k], sd[k].float()) for k in large)
    from emocast_lib.cli import main

    assert main(["convert", str(tiny_file), str(tmp_path / "cli.safetensors"), "--dtype", fmt]) == 0  # the command
    by_cli, meta_cli = read_state_dict(tmp_path / "cli.safetensors")
    assert meta_cli == meta and by_cli.keys() == sd.keys()
    assert all(by_cli[k].dtype == sd[k].dtype and torch.equal(by_cli[k].view(torch.uint8), sd[k].view(torch.uint8))
               for k in sd)


def test_convert_refuses_values_beyond_fp8_and_writes_nothing(tmp_path, tiny_file):
    sd = read_state_dict(tiny_file)[0]
    key = sorted(large_weights(EmoCASTNet(TINY_NET, device="meta")))[0]
    sd[key] = sd[key] * 0 + 1000.0
    src = tmp_path / "big.safetensors"
    save_file(sd, src, metadata={CONFIG_KEY: TINY_NET.to_json()})
    with pytest.raises(CheckpointError, match=rf"{key} has values beyond the fp8_e4m3fn range"):
        convert_file(src, tmp_path / "out.safetensors", "fp8_e4m3fn")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.safetensors"]


def test_released_widths_store_half_of_fp16():
    """The released network's storage, counted on the meta device: the linear/conv weights in fp8 are half of
    their fp16 bytes, and the rest (norms, biases, buffers: 2.8 M values in fp16) is 0.22% of the network."""
    config = NetConfig()
    meta = {k: torch.empty(s, device="meta") for k, s in net_shapes(config).items()}
    fp8 = assign_weights(EmoCASTNet(config, device="meta", operations=CastOps), meta, torch.float16, "meta",
                         "fp8_e4m3fn")
    fp16 = assign_weights(EmoCASTNet(config, device="meta"), meta, torch.float16, "meta")
    large = large_weights(fp8)
    assert nbytes(fp8, large) * 2 == nbytes(fp16, large)
    assert nbytes(fp8, meta) - nbytes(fp8, large) < 0.003 * nbytes(fp8, meta)
    assert nbytes(fp8, meta) < 2.51e9 < 4.9e9 < nbytes(fp16, meta)  # README: 2.50 GB and 4.99 GB


def released_blocks(weight_dtype: str) -> torch.nn.ModuleList:
    """The deepest level of the released denoising UNet: a resnet block and a spatial transformer at 1280
    channels, filled by the fill rule (68 M parameters)."""
    u = NetConfig().unet
    c, ops = u.block_out_channels[-1], CastOps if weight_dtype != "default" else None
    with torch.device("meta"):
        blocks = torch.nn.ModuleList([
            ResnetBlock(c, c, u.time_embed_dim, u.norm_num_groups, **({"operations": ops} if ops else {})),
            SpatialTransformer(c, u.heads, u.cross_attention_dim, u.norm_num_groups,
                               **({"operations": ops} if ops else {}))])
    if weight_dtype == "default":
        return fill_module(blocks, TINY_SEED).eval()
    sd = {k: fill_tensor(TINY_SEED, k, v.shape) for k, v in blocks.state_dict().items()}
    return assign_weights(blocks, sd, torch.float32, "cpu", weight_dtype)


@pytest.mark.slow
@pytest.mark.parametrize("fmt,tol", [("fp8_e4m3fn", 0.091), ("fp8_e5m2", 0.141)])
def test_released_width_blocks_in_fp8(fmt, tol):
    """Relative RMS deviation of the two blocks' output from fp32, on random inputs of a 4x4 grid. Measured:
    e4m3fn 0.061, e5m2 0.094 (weight rounding, the same on every CPU; bound 1.5x). e4m3fn gains less than its
    extra mantissa bit promises: at these widths the fill rule's weights (std 1/sqrt(fan-in): 0.009 for the 3x3
    convolutions, 91% of whose weights lie below e4m3fn's smallest normal number 2^-6) are partly subnormal,
    where its precision thins out."""
    g = torch.Generator().manual_seed(5)
    u = NetConfig().unet
    c = u.block_out_channels[-1]
    x, temb = torch.randn(2, c, 4, 4, generator=g), torch.randn(2, u.time_embed_dim, generator=g)
    context = torch.randn(2, 77 + 4, u.cross_attention_dim, generator=g)  # text + identity tokens

    def run(blocks):
        h = blocks[0](x, temb)
        return blocks[1].write(h, context)[0]

    with torch.no_grad():
        ref, got = run(released_blocks("default")), run(released_blocks(fmt))
    rel = ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    assert rel <= tol, rel


def test_precision_bench_on_the_tiny_network():
    """`python -m emocast_lib.bench.precision`'s measurement: the float32 row is the reference itself, the fp8 row
    holds half of fp16's linear/conv bytes and deviates less than an unrelated video."""
    from emocast_lib.bench.precision import measure, table

    result = measure("tiny", ["fp16", "fp8_e4m3fn/fp16"])
    rows = {r["choice"]: r for r in result["rows"]}
    assert list(rows) == ["unrelated", "fp32", "fp16", "fp8_e4m3fn/fp16"]
    assert rows["fp32"]["frames_max"] == rows["fp32"]["latents_rel_rms"] == 0
    assert rows["fp8_e4m3fn/fp16"]["bytes"]["linear_conv"] * 2 == rows["fp16"]["bytes"]["linear_conv"]
    assert 0 < rows["fp16"]["frames_mean"] < rows["fp8_e4m3fn/fp16"]["frames_mean"] < rows["unrelated"]["frames_mean"]
    assert "| fp8_e4m3fn/fp16 |" in table(result)


# --- the runners: `generate --weight-dtype`, the batch option, the session -----------------------------------

@pytest.fixture(scope="module")
def short_job(tmp_path_factory) -> Path:
    """The shipped portrait and 0.3 s of the shipped speech (one clip), as a folder."""
    import soundfile

    from emocast_lib.cli import EXAMPLES

    folder = tmp_path_factory.mktemp("fp8_job")
    (folder / "portrait.png").write_bytes((EXAMPLES / "emocast_portrait.png").read_bytes())
    wave, rate = soundfile.read(EXAMPLES / "emocast_speech.wav", dtype="float32")
    soundfile.write(folder / "speech.wav", wave[: int(0.3 * rate)], rate)
    return folder


@pytest.mark.parametrize("fmt", FORMATS)
def test_session_loads_the_network_with_fp8_weights(tiny_models, fmt):
    from emocast_lib.jobs import ModelSettings, Session

    with Session(ModelSettings(models=tiny_models, device="cpu", weight_dtype=fmt)) as session:
        state = session.net.state_dict()
        large = large_weights(session.net)
        assert {state[k].dtype for k in large} == {STORAGE_FORMATS[fmt]}
        assert {v.dtype for k, v in state.items() if k not in large} == {session.dtype}


def test_weight_dtype_is_an_option_of_generate_and_batch(capsys):
    from emocast_lib.cli import main
    from emocast_lib.jobs.checks import storage_problems

    for command in ("generate", "batch"):
        assert main([command, "--help"]) == 0
        assert "--weight-dtype {default,fp8_e4m3fn,fp8_e5m2}" in " ".join(capsys.readouterr().out.split())
    assert main(["generate", "--weight-dtype", "fp8_e4m3fn_fast"]) == 2  # ComfyUI's fp8 matmul, not a format
    assert "argument --weight-dtype: invalid choice: 'fp8_e4m3fn_fast'" in capsys.readouterr().err
    assert storage_problems("fp8_e4m3fn", torch.device("mps"))[0].field == "weight_dtype"  # no fp8 on Apple's MPS
    assert storage_problems("fp8_e4m3fn", torch.device("cpu")) == storage_problems("default", torch.device("mps")) == []


@pytest.mark.slow
def test_generate_and_batch_run_with_fp8_weights(tiny_models, short_job, tmp_path, capsys):
    """`generate --weight-dtype fp8_e5m2` makes the video; the batch records the weight dtype in each mp4, so a
    rerun with another one makes the video again instead of skipping it."""
    from emocast_lib.batch import read_record
    from emocast_lib.cli import main

    out = tmp_path / "fp8.mp4"
    assert main(["generate", "--models", str(tiny_models), "--image", str(short_job / "portrait.png"), "--audio",
                 str(short_job / "speech.wav"), "--out", str(out), "--weight-dtype", "fp8_e5m2", "--steps", "2"]) == 0
    assert out.is_file()
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"image": str(short_job / "portrait.png"), "audio": str(short_job / "speech.wav"),
                                "emotion": "A calm portrait.", "out": str(tmp_path / "batch.mp4"), "steps": 2}) + "\n")
    batch = ["batch", str(jobs), "--models", str(tiny_models), "--threads", "1"]
    assert main([*batch, "--weight-dtype", "fp8_e4m3fn"]) == 0
    assert read_record(tmp_path / "batch.mp4")["weight_dtype"] == "fp8_e4m3fn"
    assert main([*batch, "--weight-dtype", "fp8_e4m3fn"]) == 0  # the same settings: skipped
    assert json.loads(jobs.with_suffix(".report.json").read_text())["jobs"][0]["status"] == "skipped"
    assert main(batch) == 0  # default weights: made again
    assert json.loads(jobs.with_suffix(".report.json").read_text())["jobs"][0]["status"] == "done"
    assert read_record(tmp_path / "batch.mp4")["weight_dtype"] == "default"
