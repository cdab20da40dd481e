"""What the speed levers do (no timing here: speed is measured by `python -m emocast_lib.bench`).

Exact reuse: the source portrait's VAE latent and reference-UNet rows are computed once and reused
while the reference context stays the same, bit for bit what a fresh computation gives.
Experimental levers: the scheduler choice runs the steps asked for and solves the released noise
schedule (checked on a data distribution whose exact denoiser is known); `cfg_end` runs the
conditional half alone after the guided steps; `cache_interval` runs the deep stages only every that
many steps and reuses their features in between."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from emocast_lib import pipeline
from emocast_lib.bench.tiny import TINY_NET, TINY_SEED, TINY_VAE, filled_net, filled_vae
from emocast_lib.config import REGIONS, SamplingConfig
from emocast_lib.models import DeepFeatures
from emocast_lib.pipeline import AudioWindows, Emotion, Portrait, ReferenceBank, diffusers_vae, iter_clips
from emocast_lib.sampling import SCHEDULERS, check_settings, guided_steps, make_scheduler

FRAMES, MOTION = 4, 2


@pytest.fixture(scope="module")
def net():
    return filled_net(TINY_NET, TINY_SEED)


@pytest.fixture(scope="module")
def vae():
    return filled_vae(TINY_VAE, TINY_SEED)


def _inputs(clips: int, emotions: int = 1, seed: int = 0) -> tuple[Portrait, AudioWindows, Emotion]:
    """Random inputs of the preprocessing's shapes; `emotions` > 1 gives an emotion schedule that
    changes at clip boundaries (clip c shows emotion min(c, emotions - 1))."""
    g = torch.Generator().manual_seed(seed)
    cfg, size = TINY_NET, TINY_NET.sample_size
    h = size // 8
    masks = {r: [torch.rand((h >> lvl) ** 2, generator=g) for lvl in range(4)] for r in REGIONS}
    portrait = Portrait(torch.rand(3, size, size, generator=g) * 2 - 1, torch.randn(cfg.image_proj.embedding_dim,
                        generator=g), torch.rand(3, size, size, generator=g), masks)
    ap, d = cfg.audio_proj, cfg.unet.cross_attention_dim
    audio = AudioWindows(torch.randn(clips * FRAMES, ap.window, ap.layers, ap.channels, generator=g), clips * FRAMES)
    prompts = torch.randn(emotions, 77, d, generator=g)
    cond = prompts[[min(c, emotions - 1) for c in range(clips) for _ in range(FRAMES)]]
    return portrait, audio, Emotion(cond, torch.randn(1, 77, d, generator=g))


def _settings(**kw) -> SamplingConfig:
    return SamplingConfig(**{"steps": 1, "frames_per_clip": FRAMES, "motion_frames": MOTION} | kw)


def _rows_per_call(module: torch.nn.Module, calls: list[int]):
    return module.register_forward_hook(lambda mod, args, out: calls.append(int(args[0].shape[0])))


# ------------------------------------------------------------------------------------- exact reuse

@pytest.mark.parametrize("emotions", [1, 2])
def test_source_rows_computed_once_per_reference_context(net, vae, monkeypatch, emotions):
    """One emotion: the source is encoded once and its two reference rows run once per video; the
    first clip (motion frames = source) runs nothing else, later clips only their motion frames. A
    schedule that changes the clip's emotion recomputes the source rows for the new context only."""
    encoded: list[int] = []
    codec = diffusers_vae(vae)
    encode = codec.encode
    monkeypatch.setattr(codec, "encode", lambda x: encoded.append(x.shape[0]) or encode(x))
    rows: list[int] = []
    hook = _rows_per_call(net.reference_unet, rows)
    try:
        clips = list(iter_clips(net, codec, *_inputs(3, emotions), _settings()))
    finally:
        hook.remove()
    assert len(clips) == 3
    assert encoded == [1, MOTION, MOTION]
    # clip 0: the source rows only; clip 1: the source rows again if its emotion is new, then its motion rows.
    assert rows == [2] + [2] * (emotions - 1) + [2 * MOTION, 2 * MOTION]


def test_reuse_is_bit_identical_to_fresh_computation(net, vae, monkeypatch):
    """The bank every clip gets equals, bit for bit, a fresh ReferenceBank (nothing cached) given
    the same motion frames and context; also across an emotion change."""
    calls: list[tuple] = []

    class Recording(ReferenceBank):
        def __call__(self, motion, context):
            bank = super().__call__(motion, context)
            calls.append((motion, context, bank))
            return bank

    monkeypatch.setattr(pipeline, "ReferenceBank", Recording)
    portrait, audio, emotion = _inputs(3, emotions=2)
    codec = diffusers_vae(vae)
    list(iter_clips(net, codec, portrait, audio, emotion, _settings()))
    assert len(calls) == 3 and calls[0][0] is None and all(c[0] is not None for c in calls[1:])
    assert not torch.equal(calls[0][1], calls[1][1]) and torch.equal(calls[1][1], calls[2][1])
    for clip, (motion, context, bank) in enumerate(calls):
        fresh = ReferenceBank(net, codec, portrait.pixels, MOTION, 0.18215)(motion, context)
        assert fresh.keys() == bank.keys()
        assert all(torch.equal(fresh[k], bank[k]) for k in bank), f"clip {clip}: reused rows differ from fresh ones"


def test_reference_bank_has_the_released_row_layout(net, vae):
    """Assembled from the source rows and the motion rows, the bank is the released one-call layout:
    rows [source, motion 1, motion 2] twice, row i paired with context row i mod 2."""
    portrait, _, _ = _inputs(1)
    g = torch.Generator().manual_seed(5)
    motion = torch.rand(MOTION, *portrait.pixels.shape, generator=g) * 2 - 1
    context = torch.randn(2, 81, TINY_NET.unet.cross_attention_dim, generator=g)
    codec = diffusers_vae(vae)
    with torch.no_grad():
        bank = ReferenceBank(net, codec, portrait.pixels, MOTION, 0.18215)(motion, context)
        latents = codec.encode(torch.cat([portrait.pixels[None], motion])) * 0.18215
        released = net.reference_unet(latents.repeat(2, 1, 1, 1), context)
    for key, value in released.items():  # batch composition moves float32 sums by ~1e-6
        torch.testing.assert_close(bank[key], value, rtol=0, atol=1e-4, msg=key)


# ------------------------------------------------------------------------------------- schedulers

def _exact_v(x: torch.Tensor, t: int, alphas_cumprod: torch.Tensor, mu: float, s: float) -> torch.Tensor:
    """The exact v-prediction for data ~ N(mu, s^2) per element (its denoiser is linear)."""
    a2 = alphas_cumprod[t].double()
    a, sigma, x = a2.sqrt(), (1 - a2).sqrt(), x.double()
    x0 = mu + a * s**2 / (a2 * s**2 + sigma**2) * (x - a * mu)
    return (a * (x - a * x0) / sigma - sigma * x0).float()


def _solve(name: str, steps: int, z: torch.Tensor, mu: float, s: float) -> tuple[torch.Tensor, int]:
    """Sample with the exact model of the released noise schedule (what the network was trained on)."""
    released = make_scheduler(steps, "ddim").alphas_cumprod
    sched = make_scheduler(steps, name)
    x, calls = z * sched.init_noise_sigma, 0
    for t in sched.timesteps:
        x = sched.step(_exact_v(x, int(t), released, mu, s), t, x).prev_sample
        calls += 1
    return x, calls


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_solves_the_released_noise_schedule(name):
    """Each scheduler takes the released timesteps (trailing: from t=999) and noise schedule (zero
    terminal SNR), runs exactly `steps` model calls and ends on clean latents: on Gaussian data whose
    exact denoiser is known, its error to the exact ODE solution (mu + s z) falls
    with the step count, and the multistep solvers are at least as close as DDIM at equal steps."""
    mu, s = 0.7, 0.5
    z = torch.randn(1, 4, 4096, generator=torch.Generator().manual_seed(0))
    errors = []
    for steps in (5, 10, 20):
        x, calls = _solve(name, steps, z, mu, s)
        sched, released = make_scheduler(steps, name), make_scheduler(steps, "ddim")
        assert calls == steps and torch.equal(sched.timesteps, released.timesteps)
        # Zero terminal SNR: the released alphas, the last one (0) clamped to at most 2**-24 (finite sigma).
        torch.testing.assert_close(sched.alphas_cumprod[:-1], released.alphas_cumprod[:-1], rtol=1e-6, atol=0)
        assert sched.alphas_cumprod[-1] <= 2**-24
        errors.append((x - (mu + s * z)).abs().mean().item())
        ddim, _ = _solve("ddim", steps, z, mu, s)
        assert errors[-1] <= (ddim - (mu + s * z)).abs().mean().item() * (1 + 1e-6)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.15 * s


@pytest.mark.parametrize("name", SCHEDULERS)
def test_pipeline_runs_each_scheduler_for_its_steps(net, vae, name):
    sizes: list[int] = []
    hook = _rows_per_call(net.denoising_unet, sizes)
    try:
        (clip,) = iter_clips(net, diffusers_vae(vae), *_inputs(1), _settings(steps=3, scheduler=name))
    finally:
        hook.remove()
    assert sizes == [2, 2, 2] and torch.isfinite(clip.latents).all()


@pytest.mark.parametrize("settings,message", [(_settings(scheduler="euler"), "scheduler: 'euler' is unknown"),
                                              (_settings(cfg_end=1.5), "cfg_end: 1.5 is not a fraction"),
                                              (_settings(cache_interval=0), "cache_interval: 0 is below 1")])
def test_bad_lever_values_are_rejected_before_work(settings, message):
    with pytest.raises(ValueError, match=message):
        check_settings(settings)


# ------------------------------------------------------------------------------------- guidance and reuse

class _Prepared(Exception):
    """Stops iter_clips once it has prepared the clip's conditioning."""


def _clip_context(net, vae, monkeypatch, variant: str = "released"):
    """The ClipContext that iter_clips prepares for clip 0, and initial latents. Variants: "schedule",
    an emotion that changes inside the clip (one context row per frame); "unconditional audio", audio
    tokens in the unconditional half too (its rows then need their own audio keys/values)."""
    captured = {}

    def spy(cond, bank):
        captured.update(cond=cond, bank=bank)
        raise _Prepared

    monkeypatch.setattr(net.denoising_unet, "prepare", spy)
    portrait, audio, emotion = _inputs(1)
    if variant == "schedule":
        emotion = Emotion(emotion.cond + torch.arange(FRAMES)[:, None, None] * 0.1, emotion.uncond)
    with pytest.raises(_Prepared):
        next(iter_clips(net, diffusers_vae(vae), portrait, audio, emotion, _settings()))
    monkeypatch.undo()
    cond = captured["cond"]
    if variant == "unconditional audio":
        cond = replace(cond, audio=torch.cat([cond.audio[1:] * 0.5, cond.audio[1:]]))
    latents = torch.randn(1, 4, FRAMES, TINY_NET.sample_size // 8, TINY_NET.sample_size // 8,
                          generator=torch.Generator().manual_seed(3))
    return net.denoising_unet.prepare(cond, captured["bank"]), latents


@pytest.mark.parametrize("steps,cfg_end,guided", [(40, 1.0, 40), (40, 0.5, 20), (3, 0.5, 2), (3, 0.0, 0),
                                                  (10, 0.3, 3), (7, 1 / 7, 1)])
def test_guided_steps(steps, cfg_end, guided):
    assert guided_steps(steps, cfg_end) == guided


def test_cfg_end_skips_the_unconditional_half(net, vae):
    sizes: list[int] = []
    hook = _rows_per_call(net.denoising_unet, sizes)
    try:
        list(iter_clips(net, diffusers_vae(vae), *_inputs(2), _settings(steps=4, cfg_end=0.5)))
    finally:
        hook.remove()
    assert sizes == [2, 2, 1, 1] * 2


@pytest.mark.parametrize("variant", ["released", "schedule", "unconditional audio"])
def test_conditional_only_batch_is_the_conditional_half(net, vae, monkeypatch, variant):
    """Without the unconditional rows the conditional frames compute what they do in the guided batch:
    reference pairing by row parity, per-half text/identity and audio context, masks, motion frames
    (float32 sums move with the batch composition, hence the tolerance)."""
    ctx, latents = _clip_context(net, vae, monkeypatch, variant)
    t = torch.tensor(500)
    with torch.no_grad():
        guided = net.denoising_unet(torch.cat([latents, latents]), t, ctx)
        alone = net.denoising_unet(latents, t, ctx.conditional())
    torch.testing.assert_close(alone, guided[1:], rtol=0, atol=1e-4)
    assert (guided[0] - guided[1]).abs().max() > 1e-2  # the halves differ: a wrong half would show
    with pytest.raises(ValueError, match="a batch of 2 for a conditional-only clip context"):
        net.denoising_unet(torch.cat([latents, latents]), t, ctx.conditional())


def test_cache_interval_reuses_the_deep_features(net, vae):
    """cache_interval=2: the deep stages run on steps 0 and 2 only; the first level runs every step."""
    calls = {"mid": 0, "first_down": 0, "last_up": 0}
    unet = net.denoising_unet
    hooks = [module.register_forward_hook(lambda m, a, o, k=k: calls.__setitem__(k, calls[k] + 1))
             for k, module in (("mid", unet.mid_block), ("first_down", unet.down_blocks[0]),
                               ("last_up", unet.up_blocks[-1]))]
    try:
        (clip,) = iter_clips(net, diffusers_vae(vae), *_inputs(1), _settings(steps=4, cache_interval=2))
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"mid": 2, "first_down": 4, "last_up": 4} and torch.isfinite(clip.latents).all()


def test_shallow_pass_on_unchanged_features_equals_the_full_pass(net, vae, monkeypatch):
    """A shallow pass given the deep features of the same input is the full pass, bit for bit: the
    reused features enter the last up stage exactly where the full pass's own would; also for the
    conditional half reusing a guided pass's features."""
    ctx, latents = _clip_context(net, vae, monkeypatch)
    t, both = torch.tensor(700), torch.cat([latents, latents])
    with torch.no_grad():
        deep = DeepFeatures()
        full = net.denoising_unet(both, t, ctx, deep)
        assert deep.features is not None and deep.features.shape[0] == 2 * FRAMES
        assert torch.equal(net.denoising_unet(both, t, ctx, deep), full)
        alone = net.denoising_unet(latents, t, ctx.conditional(), deep)
    torch.testing.assert_close(alone, full[1:], rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------- where users set them

def test_levers_from_user_values_to_the_sampler():
    """The CLI options become JobSpec values, and job.sampling_config (CLI, batch and nodes) turns them
    into the SamplingConfig the sampler reads, or names each bad one before any work."""
    from emocast_lib.cli import build_parser
    from emocast_lib.jobs import JobError, sampling_config

    args = build_parser().parse_args(["generate", "--scheduler", "uni_pc", "--cfg-end", "0.25",
                                      "--cache-interval", "3"])
    assert (args.scheduler, args.cfg_end, args.cache_interval) == ("uni_pc", 0.25, 3)
    defaults = build_parser().parse_args(["generate"])
    assert (defaults.scheduler, defaults.cfg_end, defaults.cache_interval) == ("ddim", 1.0, 1)
    base = (40, 3.5, 42, (1.0, 1.0, 1.0), 25, 16)
    settings = sampling_config(*base, "uni_pc", 0.25, 3)
    assert (settings.scheduler, settings.cfg_end, settings.cache_interval) == ("uni_pc", 0.25, 3)
    with pytest.raises(JobError) as bad:
        sampling_config(*base, "euler", 1.5, 0)
    assert {p.field for p in bad.value.problems} == {"scheduler", "cfg_end", "cache_interval"}
