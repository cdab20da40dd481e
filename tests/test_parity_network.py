"""Parity of the network, VAE path and sampler with the reference fixtures (fixtures/parity README).

Weights come from the fill rule (no real weights exist here); tolerances are the README's §7."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, fill_mismatches, manifest_shape, read_manifest
from emocast_lib.bench.fill import fill_state_dict
from emocast_lib.bench.tiny import TINY_NET, TINY_VAE, filled_net, filled_vae
from emocast_lib.config import LATENT_SCALE, REGIONS, SamplingConfig
from emocast_lib.models import ClipConditioning
from emocast_lib.pipeline import AudioWindows, Emotion, Portrait, diffusers_vae, iter_clips
from emocast_lib.sampling import guide, make_scheduler
from reference_config import net_config


def assert_close(actual: torch.Tensor, expected: torch.Tensor, max_tol: float, rms_tol: float, what: str):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    d = (actual.double() - expected.double()).abs()
    mx, rms = d.max().item(), d.pow(2).mean().sqrt().item()
    assert mx <= max_tol and rms <= rms_tol, f"{what}: max {mx:.3g} (tol {max_tol}), rms {rms:.3g} (tol {rms_tol})"


@pytest.fixture(scope="module")
def cfg(parity_config) -> dict:
    return parity_config


@pytest.fixture(scope="module")
def net(parity_dir, cfg):
    return filled_net(net_config(cfg), cfg["run"]["weight_seed"])


@pytest.fixture(scope="module")
def vae(cfg):
    return filled_vae(cfg["vae_autoencoder_kl_config"], cfg["run"]["weight_seed"])


def load(parity_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(parity_dir / name)


def test_parity_fill_rule_matches_manifest(parity_dir, cfg):
    """The fill rule reproduces every tensor of the set's manifests (network, text encoder, VAE)."""
    seed = cfg["run"]["weight_seed"]
    rows = read_manifest(parity_dir / "tiny_net_manifest.tsv") + read_manifest(parity_dir / "tiny_aux_manifest.tsv")
    assert len({r["key"] for r in rows}) == len(rows)  # the aux modules' keys do not collide with the Net's
    bad = fill_mismatches(seed, rows, fill_state_dict(seed, {r["key"]: manifest_shape(r) for r in rows}))
    assert not bad, f"{len(bad)} fills differ, e.g. {bad[:3]}"


def test_shipped_tiny_config_is_the_fixture_one():
    """The library's tiny sizes are those of the project's parity set (tests/fixtures), whichever set is
    selected, so the tiny model `make-tiny-models` writes is the checkable one."""
    cfg = json.loads((FIXTURES / "parity" / "tiny" / "tiny_config.json").read_text())
    assert net_config(cfg) == TINY_NET
    assert {k: v for k, v in cfg["vae_autoencoder_kl_config"].items() if k in TINY_VAE} == TINY_VAE


def test_parity_filled_net_keys_and_shapes(parity_dir, net):
    expected = {row["key"]: manifest_shape(row) for row in read_manifest(parity_dir / "tiny_net_manifest.tsv")}
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == expected


def test_parity_modules(parity_dir, cfg, net):
    m = load(parity_dir, "modules.safetensors")
    with torch.no_grad():
        for c in range(cfg["run"]["num_clips"]):
            assert_close(net.audioproj(m[f"audio_proj.clip{c}.input"]), m[f"audio_proj.clip{c}.output"],
                         1e-5, 1e-6, f"audio_proj clip {c}")
        for half in ("cond", "uncond"):
            assert_close(net.imageproj(m[f"image_proj.{half}.input"]), m[f"image_proj.{half}.output"],
                         1e-5, 1e-6, f"image_proj {half}")
        x = m["face_locator.input"]
        b, c, f, h, w = x.shape
        out = net.face_locator(x.transpose(1, 2).reshape(b * f, c, h, w))
        assert_close(out.reshape(b, f, *out.shape[1:]).transpose(1, 2), m["face_locator.output"], 1e-5, 1e-6,
                     "face_locator")


def test_parity_vae(parity_dir, cfg, vae):
    v = load(parity_dir, "vae.safetensors")
    codec = diffusers_vae(vae)
    clips = sorted({key.split(".")[0] for key in v})  # every clip the set holds
    assert clips, "vae.safetensors holds no clip"
    with torch.no_grad():
        for c in clips:
            assert_close(codec.encode(v[f"{c}.encode.input"]), v[f"{c}.encode.latent_mean"], 1e-5, 1e-6,
                         f"VAE encode {c}")
            z = v[f"{c}.decode.input_latents_scaled"][0].transpose(0, 1) / LATENT_SCALE
            video = codec.decode(z).clamp(0, 1).transpose(0, 1)[None]
            assert_close(video, v[f"{c}.decode.video"], 1e-5, 1e-6, f"VAE decode {c}")


def _step_conditioning(s: dict[str, torch.Tensor]) -> ClipConditioning:
    d = {k.removeprefix("denoising_unet."): v for k, v in s.items() if k.startswith("denoising_unet.")}
    masks = {r: [d[f"{r}_mask.{lvl}"] for lvl in range(_levels(d))] for r in REGIONS}
    return ClipConditioning(d["encoder_hidden_states"], d["mask_cond_fea"], d["audio_embedding"], d["emo_label"],
                            masks, tuple(d["motion_scale"].tolist()))


# The sub-blocks the fixtures record: the UNet's input/output layers, every stage and every module of a stage.
BLOCK = re.compile(r"conv_in|conv_norm_out|conv_out|(mid_block|(down|up)_blocks\.\d+)"
                   r"(\.(resnets|attentions|audio_modules|motion_modules|downsamplers|upsamplers)\.\d+)?")


@contextmanager
def recorded_blocks(unet: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Output of every sub-block run inside the `with`, by module name (forward hooks). `conv_in` is the
    convolution alone, before the face-locator features are added."""
    trace: dict[str, torch.Tensor] = {}
    handles = [module.register_forward_hook(lambda m, args, out, name=name: trace.__setitem__(name, out))
               for name, module in unet.named_modules() if BLOCK.fullmatch(name)]
    try:
        yield trace
    finally:
        for handle in handles:
            handle.remove()


def test_parity_unet_step(parity_dir, net):
    s = load(parity_dir, "unet_step.safetensors")
    inter = load(parity_dir, "unet_step_intermediates.safetensors")
    with torch.no_grad():
        bank = net.reference_unet(s["reference_unet.sample"], s["reference_unet.encoder_hidden_states"])
        for key, value in bank.items():
            assert_close(value, s[f"reference_bank.{key}.transformer_blocks.0"], 1e-4, 1e-5, f"reference bank {key}")
        ctx = net.denoising_unet.prepare(_step_conditioning(s), bank)
        with recorded_blocks(net.denoising_unet) as trace:
            out = net.denoising_unet(s["denoising_unet.sample"], s["denoising_unet.timestep"], ctx)
    # Localise a divergence first: every executed sub-block, in call order (scaled tolerance: the
    # stages are not unit scale; the fp16 reference bank sets the floor).
    order = json.loads(load_meta(parity_dir / "unet_step_intermediates.safetensors")["call_order"])
    assert set(order) == set(trace), f"executed blocks differ: {sorted(set(order) ^ set(trace))}"
    for name in order:
        ours, ref = trace[name], inter[name]
        if ours.dim() == 4:  # folded (2f, C, h, w) -> (2, C, f, h, w)
            ours = ours.view(2, -1, *ours.shape[1:]).transpose(1, 2)
        ref = ref[:, :, -ours.shape[2]:]  # motion-module outputs also hold the motion frames
        scale = ref.std().item()
        assert_close(ours, ref, 2e-3 * max(scale, 1), 2e-4 * max(scale, 1), f"sub-block {name}")
    assert_close(out, s["denoising_unet.output"], 2e-4, 2e-5, "unet step output")


def load_meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return fh.metadata()


def _levels(tensors: dict[str, torch.Tensor]) -> int:
    """How many mask levels the file holds (`full_mask.0`, `full_mask.1`, ...)."""
    return sum(1 for key in tensors if key.startswith(f"{REGIONS[0]}_mask."))


def _portrait(p: dict[str, torch.Tensor], src: torch.Tensor) -> Portrait:
    return Portrait(pixels=src, identity=p["face_emb"][0], face_region=p["face_region"][0],
                    masks={r: [p[f"{r}_mask.{lvl}"][0] for lvl in range(_levels(p))] for r in REGIONS})


def _settings(cfg: dict, p: dict[str, torch.Tensor], steps: int) -> SamplingConfig:
    run = cfg["run"]
    return SamplingConfig(steps=steps, cfg_scale=run["cfg_scale"], frames_per_clip=run["n_sample_frames"],
                          motion_frames=run["n_motion_frames"], motion_scale=tuple(p["motion_scale"].tolist()))


def test_parity_scheduler(parity_dir, cfg):
    p = load(parity_dir, "pipeline_clip0.safetensors")
    sched = make_scheduler(len(p["timesteps"]))
    assert torch.equal(sched.timesteps, p["timesteps"])
    # ᾱ is a float32 cumulative product over the T training steps (twice, around the zero-SNR rescale): each
    # product rounds by at most 2**-24 relative, so another evaluation order (CPU vector width) stays within
    # T * 2**-24 relative (6e-5; measured 3.4e-6). A wrong schedule is off by 3.5e-2 relative or more
    # (beta_end 0.0121 instead of 0.012; scaled_linear 2.1; no zero-SNR rescale: ᾱ[T-1] != 0).
    table = p["scheduler.alphas_cumprod"]
    torch.testing.assert_close(sched.alphas_cumprod, table, rtol=len(table) * 2**-24, atol=0, msg="alphas_cumprod")
    for i, t in enumerate(sched.timesteps):  # guidance and the DDIM update alone, from the stored tensors
        pred = guide(p[f"step{i}.noise_pred_raw"], cfg["run"]["cfg_scale"])
        assert_close(pred, p[f"step{i}.noise_pred_guided"], 1e-6, 1e-7, f"step {i} guidance")
        out = sched.step(p[f"step{i}.noise_pred_guided"], t, p[f"step{i}.latents_in"], eta=0.0).prev_sample
        # README §7's limits for unit-scale stages: ᾱ's last bits (above) move the update by up to 7e-7 / rms 1.7e-7
        assert_close(out, p[f"step{i}.latents_out"], 1e-5, 1e-6, f"step {i} scheduler update")


def test_parity_pipeline_clip0(parity_dir, cfg, net, vae):
    p = load(parity_dir, "pipeline_clip0.safetensors")
    m = load(parity_dir, "modules.safetensors")
    f = cfg["run"]["n_sample_frames"]
    steps: dict[int, dict] = {}
    encoded = []
    codec = diffusers_vae(vae)
    encode = codec.encode
    codec.encode = lambda x: encoded.append(encode(x)) or encoded[-1]
    windows = m["audio_proj.windowed_audio_features"][:f]
    clips = iter_clips(net, codec, _portrait(p, p["ref_image"][0, 0]), AudioWindows(windows, f),
                       Emotion(p["emo_text_emb.cond"], p["emo_text_emb.uncond"]),
                       _settings(cfg, p, len(p["timesteps"])), noise=lambda c: p["initial_latents"],
                       on_step=lambda clip, i, lat: steps.setdefault(i, {"latents_out": lat.clone()}))
    result = next(clips)
    # The source is encoded once (clip 0's motion frames are the source too: every reference row is it).
    assert_close((encoded[0] * LATENT_SCALE).expand_as(p["ref_image_latents"]), p["ref_image_latents"], 1e-5, 1e-6,
                 "reference latents")
    for i in sorted(steps):
        assert_close(steps[i]["latents_out"], p[f"step{i}.latents_out"], 1e-3, 1e-4, f"step {i} latents")
    assert_close(result.latents, p["final_latents"], 1e-3, 1e-4, "final latents")
    assert_close(result.frames.transpose(0, 1)[None], p["video"], 5e-4, 5e-5, "clip 0 video")


def test_parity_multiclip(parity_dir, cfg, net, vae):
    mc = load(parity_dir, "multiclip.safetensors")
    p = load(parity_dir, "pipeline_clip0.safetensors")
    m = load(parity_dir, "modules.safetensors")
    length = int(mc["audio_length"])
    refs = []
    codec = diffusers_vae(vae)
    encode = codec.encode
    codec.encode = lambda x: refs.append(x) or encode(x)
    clips = list(iter_clips(net, codec, _portrait(p, mc["source_image_pixels"]),
                            AudioWindows(m["audio_proj.windowed_audio_features"], length),
                            Emotion(p["emo_text_emb.cond"], p["emo_text_emb.uncond"]),
                            _settings(cfg, p, len(p["timesteps"])), noise=lambda c: mc[f"clip{c}.initial_latents"]))
    assert len(clips) == cfg["run"]["num_clips"]
    assert_close(clips[0].latents, mc["clip0.final_latents"], 1e-3, 1e-4, "clip 0 final latents")
    for c in range(1, len(clips)):
        # refs[0] is the source portrait (encoded once); later clips encode their motion frames only.
        assert_close(refs[c], mc[f"clip{c}.ref_image"][0, 1:], 2e-3, 2e-4, f"clip {c} motion frames")
        assert_close(clips[c].latents, mc[f"clip{c}.final_latents"][:, :, : clips[c].latents.shape[2]], 5e-3, 5e-4,
                     f"clip {c} final latents")
    video = torch.cat([c.frames for c in clips]).transpose(0, 1)
    assert_close(video, mc["final_video"], 2e-3, 2e-4, "final video")
