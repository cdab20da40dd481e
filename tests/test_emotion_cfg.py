"""emotion_cfg: a separate guidance scale for the emotion prompt, per video and per schedule segment.

noise = u + cfg * (n - u) + emotion_cfg * (c - n), n the neutral half (the conditional half with the empty
prompt wherever the emotion prompt enters). Left unset (or equal to cfg, every strength 1) the neutral
half is never computed and the sampler runs the released calls; otherwise one step equals the formula on
independently computed halves (parity fixture inputs, tiny models)."""
from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from emocast_lib.bench.tiny import TINY_NET, TINY_SEED, TINY_VAE, filled_net, filled_vae
from emocast_lib.config import LATENT_SCALE, REGIONS, SamplingConfig
from emocast_lib.emotion import (
    emotion_cfg_problem,
    emotion_schedule,
    split_strength,
    strength_problem,
    strength_schedule,
)
from emocast_lib.models import ClipConditioning
from emocast_lib.pipeline import AudioWindows, Emotion, Portrait, diffusers_vae, emotion_scales, iter_clips
from emocast_lib.sampling import check_settings, make_scheduler
from packimport import pack_module
from reference_config import net_config

ROOT = Path(__file__).resolve().parents[1]
FRAMES, MOTION = 4, 2


@pytest.fixture(scope="module")
def tiny():
    return filled_net(TINY_NET, TINY_SEED), diffusers_vae(filled_vae(TINY_VAE, TINY_SEED))


def _inputs(clips: int, seed: int = 0) -> tuple[Portrait, AudioWindows, Emotion]:
    """Random inputs of the preprocessing's shapes, one emotion prompt."""
    g = torch.Generator().manual_seed(seed)
    cfg, size = TINY_NET, TINY_NET.sample_size
    masks = {r: [torch.rand((size // 8 >> lvl) ** 2, generator=g) for lvl in range(4)] for r in REGIONS}
    portrait = Portrait(torch.rand(3, size, size, generator=g) * 2 - 1,
                        torch.randn(cfg.image_proj.embedding_dim, generator=g), torch.rand(3, size, size, generator=g),
                        masks)
    ap, d = cfg.audio_proj, cfg.unet.cross_attention_dim
    audio = AudioWindows(torch.randn(clips * FRAMES, ap.window, ap.layers, ap.channels, generator=g), clips * FRAMES)
    return portrait, audio, Emotion(torch.randn(1, 77, d, generator=g), torch.randn(1, 77, d, generator=g))


def _settings(**kw) -> SamplingConfig:
    return SamplingConfig(**{"steps": 2, "frames_per_clip": FRAMES, "motion_frames": MOTION} | kw)


def _run(net, vae, inputs, settings) -> tuple[torch.Tensor, list[int], list[int], list[int]]:
    """Latents of every clip, and the rows of every denoising-UNet call, reference-UNet call and VAE encode."""
    unet_rows, ref_rows, encoded = [], [], []
    hooks = [net.denoising_unet.register_forward_hook(lambda m, a, o: unet_rows.append(a[0].shape[0])),
             net.reference_unet.register_forward_hook(lambda m, a, o: ref_rows.append(a[0].shape[0]))]
    encode = vae.encode
    counting = replace(vae, encode=lambda x: encoded.append(x.shape[0]) or encode(x))
    try:
        latents = torch.cat([c.latents for c in iter_clips(net, counting, *inputs, settings)], dim=2)
    finally:
        for h in hooks:
            h.remove()
    return latents, unet_rows, ref_rows, encoded


# ------------------------------------------------------------------------------------- the released default

def test_unset_or_equal_to_cfg_runs_the_released_calls_only(tiny):
    """emotion_cfg unset, equal to cfg, or strengths that are all 1: the same calls (a batch of 2 halves per
    step, the released reference rows and VAE encodes) and the same latents, bit for bit."""
    net, vae = tiny
    portrait, audio, emotion = _inputs(2)
    released = _run(net, vae, (portrait, audio, emotion), _settings())
    assert released[1:] == ([2, 2] * 2, [2, 2 * MOTION], [1, MOTION])
    ones = Emotion(emotion.cond, emotion.uncond, torch.ones(2 * FRAMES))
    for inputs, settings in (((portrait, audio, emotion), _settings(emotion_cfg=3.5)),
                             ((portrait, audio, ones), _settings()),
                             ((portrait, audio, ones), _settings(cfg_scale=5.0, emotion_cfg=5.0))):
        latents, *calls = _run(net, vae, inputs, settings)
        assert calls == list(released[1:])
        if settings.cfg_scale == 3.5:
            assert torch.equal(latents, released[0])


def test_another_emotion_cfg_adds_the_neutral_half(tiny):
    """emotion_cfg != cfg: every guided step also runs the neutral half alone (a batch of 1 after the
    released 2); each clip runs one more reference pass, on the neutral context (its source rows once
    per video); the motion frames are still encoded once; the result differs."""
    net, vae = tiny
    inputs = _inputs(2)
    released, *_ = _run(net, vae, inputs, _settings())
    latents, unet_rows, ref_rows, encoded = _run(net, vae, inputs, _settings(emotion_cfg=6.0))
    assert unet_rows == [2, 1, 2, 1] * 2
    assert ref_rows == [2, 2, 2 * MOTION, 2 * MOTION] and encoded == [1, MOTION]
    assert (latents - released).abs().max() > 1e-2


@pytest.mark.parametrize("levers,rows", [({"cfg_end": 0.5, "steps": 4}, [2, 1, 2, 1, 1, 1]),
                                         ({"cfg_end": 0.0}, [1, 1]),
                                         ({"scheduler": "dpmpp_2m"}, [2, 1, 2, 1]),
                                         ({"scheduler": "uni_pc"}, [2, 1, 2, 1])])
def test_with_the_speed_levers(tiny, levers, rows):
    """cfg_end ends the emotion guidance with the rest of the guidance (the conditional half alone after
    it); the schedulers take the guided prediction as it is."""
    net, vae = tiny
    latents, unet_rows, *_ = _run(net, vae, _inputs(1), _settings(emotion_cfg=6.0, **levers))
    assert unet_rows == rows and torch.isfinite(latents).all()


def test_with_cache_interval_the_neutral_half_keeps_its_own_deep_features(tiny):
    """cache_interval=2: both batches run the deep stages on steps 0 and 2 only, and a shallow pass of
    the neutral half reuses the neutral half's deep features (a batch of 1), not the released batch's."""
    net, vae = tiny
    unet = net.denoising_unet
    deep_rows, shallow = [], []
    hooks = [unet.mid_block.register_forward_hook(lambda m, a, o: deep_rows.append(a[0].shape[0])),
             unet.up_blocks[-1].register_forward_hook(lambda m, a, o: shallow.append(a[0].shape[0]))]
    try:
        (clip,) = iter_clips(net, vae, *_inputs(1), _settings(steps=4, cache_interval=2, emotion_cfg=6.0))
    finally:
        for h in hooks:
            h.remove()
    assert deep_rows == [2 * FRAMES, FRAMES] * 2  # steps 0 and 2, the released batch then the neutral half
    assert shallow == [2 * FRAMES, FRAMES] * 4 and torch.isfinite(clip.latents).all()


# ------------------------------------------------------------------------------------- one step against the formula

def _fixture_run(parity_dir: Path, parity_config: dict):
    """The parity set's multi-clip inputs (real encodings of the prompt and of the empty prompt, face,
    masks, audio) on its filled network, with per-frame strengths."""
    run = parity_config["run"]
    p, m = load_file(parity_dir / "pipeline_clip0.safetensors"), load_file(parity_dir / "modules.safetensors")
    mc = load_file(parity_dir / "multiclip.safetensors")
    levels = sum(1 for key in p if key.startswith(f"{REGIONS[0]}_mask."))
    portrait = Portrait(mc["source_image_pixels"], p["face_emb"][0], p["face_region"][0],
                        {r: [p[f"{r}_mask.{lvl}"][0] for lvl in range(levels)] for r in REGIONS})
    windows = m["audio_proj.windowed_audio_features"]
    f = run["n_sample_frames"]
    strength = torch.linspace(0.5, 2.0, f).repeat(windows.shape[0] // f)  # a different weight on every frame
    emotion = Emotion(p["emo_text_emb.cond"], p["emo_text_emb.uncond"], strength)
    settings = SamplingConfig(steps=len(p["timesteps"]), cfg_scale=run["cfg_scale"], frames_per_clip=f,
                              motion_frames=run["n_motion_frames"], motion_scale=tuple(p["motion_scale"].tolist()),
                              emotion_cfg=6.0)
    return portrait, AudioWindows(windows, int(mc["audio_length"])), emotion, settings, mc


def _released_layout_step(net, codec, portrait, audio, emotion, settings, clip, motion, latents, wrong=None):
    """Step 0 of `clip` from the halves computed apart, in the released one-call layouts: [u, c] as
    released, and n as the conditional half of a second call whose text tokens, emotive-audio emotion and
    reference pass have the empty prompt. `wrong` puts one mistake into n (the test's sensitivity)."""
    f, empty, prompt = settings.frames_per_clip, emotion.uncond, emotion.cond
    src = portrait.pixels[None]
    pixels = src.expand(1 + settings.motion_frames, -1, -1, -1) if motion is None else torch.cat([src, motion])
    reference = (codec.encode(pixels) * LATENT_SCALE).repeat(2, 1, 1, 1)  # [source, motion] twice
    ident = portrait.identity[None]
    tokens = net.imageproj(torch.cat([torch.zeros_like(ident), ident]))
    u_ctx, c_ctx = torch.cat([empty, tokens[:1]], 1), torch.cat([prompt, tokens[1:]], 1)
    n_ctx = torch.cat([empty, tokens[:1] if wrong == "identity" else tokens[1:]], 1)
    feats = net.face_locator(portrait.face_region[None].expand(f, -1, -1, -1)).transpose(0, 1)[None]
    face = torch.cat([torch.zeros_like(feats), feats])
    sound = net.audioproj(audio.windows[clip * f:(clip + 1) * f][None])
    sound = torch.cat([torch.zeros_like(sound), sound])
    masks = {r: [lvl.reshape(1, -1).expand(2 * f, -1) for lvl in portrait.masks[r]] for r in REGIONS}
    t = make_scheduler(settings.steps).timesteps[0]
    both = torch.cat([latents, latents])
    bank = net.reference_unet(reference, torch.cat([u_ctx, c_ctx]))
    released = ClipConditioning(torch.cat([u_ctx, c_ctx]), face, sound, prompt.expand(2 * f, -1, -1), masks,
                                settings.motion_scale)
    uncond, cond = net.denoising_unet(both, t, net.denoising_unet.prepare(released, bank)).chunk(2)
    bank = net.reference_unet(reference, torch.cat([u_ctx, c_ctx if wrong == "reference" else n_ctx]))
    neutral = ClipConditioning(torch.cat([u_ctx, c_ctx if wrong == "cross-attention" else n_ctx]),
                               torch.cat([feats, torch.zeros_like(feats)]) if wrong == "face" else face,
                               torch.zeros_like(sound) if wrong == "audio" else sound,
                               (prompt if wrong == "emotive audio" else empty).expand(2 * f, -1, -1), masks,
                               settings.motion_scale)
    n = net.denoising_unet(both, t, net.denoising_unet.prepare(neutral, bank))[1:]
    weights = (settings.emotion_cfg * emotion.strength[clip * f:(clip + 1) * f]).view(1, 1, -1, 1, 1)
    pred = uncond + settings.cfg_scale * (n - uncond) + weights * (cond - n)
    return make_scheduler(settings.steps).step(pred, t, latents).prev_sample


MISTAKES = ("cross-attention", "emotive audio", "reference", "identity", "face", "audio")


@pytest.mark.slow
def test_one_step_is_the_formula_on_three_halves(parity_dir, parity_config):
    """Step 0 of every clip (clip 1 reads the motion frames of clip 0) equals the formula on halves
    computed apart, within the parity noise floor (README §7, pipeline latents: 1e-3 / rms 1e-4);
    a neutral half with the emotion prompt left in any of its three places, or without the real
    identity, face or audio, is off by far more."""
    net = filled_net(net_config(parity_config), parity_config["run"]["weight_seed"])
    codec = diffusers_vae(filled_vae(parity_config["vae_autoencoder_kl_config"], parity_config["run"]["weight_seed"]))
    portrait, audio, emotion, settings, mc = _fixture_run(parity_dir, parity_config)
    first_steps = {}
    clips = list(iter_clips(net, codec, portrait, audio, emotion, settings,
                            noise=lambda c: mc[f"clip{c}.initial_latents"],
                            on_step=lambda c, i, lat: first_steps.setdefault(c, lat.clone())))
    assert len(clips) >= 2
    for c, clip in enumerate(clips):
        motion = None if c == 0 else clips[c - 1].frames[-settings.motion_frames:] * 2 - 1
        args = (net, codec, portrait, audio, emotion, settings, c, motion, mc[f"clip{c}.initial_latents"])
        with torch.no_grad():
            d = (first_steps[c] - _released_layout_step(*args)).abs()
            assert d.max() <= 1e-3 and d.pow(2).mean().sqrt() <= 1e-4, f"clip {c}: max {d.max():.3g}"
            for wrong in MISTAKES if c == len(clips) - 1 else ():  # the last clip has motion frames of its own
                off = (first_steps[c] - _released_layout_step(*args, wrong=wrong)).abs().max()
                assert off > 0.05, f"clip {c}: the step does not tell a neutral half with the {wrong} mistake ({off})"


# ------------------------------------------------------------------------------------- per segment

def test_segment_strengths_are_crossfaded_like_the_prompts():
    """Strengths 0.7 then 1.6 (0-1 s, 1-2 s, crossfade 0.4 s, 10 fps): 0.7 up to 0.8 s, 1.6 from 1.2 s,
    linear between, with the very weights that mix the two prompts."""
    segments = [(0.7, 0.0, 1.0), (1.6, 1.0, 2.0)]
    strength = strength_schedule(segments, 0.4, fps=10, num_frames=25)
    expected = [0.7] * 9 + [0.7 + 0.9 * w for w in (0.25, 0.5, 0.75)] + [1.6] * 13
    torch.testing.assert_close(strength, torch.tensor(expected), rtol=0, atol=1e-6)
    prompts = emotion_schedule([(torch.zeros(3), 0.0, 1.0), (torch.ones(3), 1.0, 2.0)], 0.4, fps=10, num_frames=25)
    torch.testing.assert_close(strength, 0.7 + 0.9 * prompts[:, 0], rtol=0, atol=1e-6)


def test_per_frame_guidance_weights_follow_the_schedule(tiny):
    """The node's schedule -> per-frame strengths -> the sampler's per-frame emotion guidance scales
    (emotion_cfg, or cfg when unset, times the strength); a clip whose every frame is at cfg runs no
    neutral half."""
    types = pack_module("types")
    d = TINY_NET.unet.cross_attention_dim
    calm, scared = torch.zeros(77, d), torch.ones(77, d)
    schedule = types.EmotionCond([(calm, 0.0, 0.4), (scared, 0.5, 1.0)], torch.zeros(1, 77, d), ["calm", "scared"],
                                 0.2, (1.0, 1.6))  # crossfade from 0.35 to 0.55 s: frames 4 and 5 of clip 1
    assert schedule.describe().splitlines()[:2] == ['0-0.4 s: "calm"', '0.5-1 s: "scared" @1.6']
    fps, frames = 10, 2 * FRAMES
    strength = schedule.per_frame_strength(fps, frames)
    mix = schedule.per_frame(fps, frames)[:, 0, 0]  # the prompt crossfade's weight of "scared"
    torch.testing.assert_close(strength, 1 + 0.6 * mix, rtol=0, atol=1e-6)
    assert torch.equal(strength[:FRAMES], torch.ones(FRAMES)) and strength[-1] == torch.tensor(1.6)
    torch.testing.assert_close(strength[FRAMES:FRAMES + 2], torch.tensor([1.15, 1.45]), rtol=0, atol=1e-6)
    emotion = Emotion(schedule.per_frame(fps, frames), schedule.uncond, strength)
    for settings, scale in ((_settings(), 3.5), (_settings(emotion_cfg=5.0), 5.0)):
        torch.testing.assert_close(emotion_scales(settings, emotion, frames), scale * strength.double(), rtol=1e-7,
                                   atol=0)
    assert types.EmotionCond([(calm, 0.0, 1.0), (scared, 1.0, 2.0)], emotion.uncond, ["a", "b"], 0.2,
                             (1.0, 1.0)).per_frame_strength(fps, frames) is None
    net, vae = tiny
    portrait, audio, _ = _inputs(2)
    _, unet_rows, ref_rows, _ = _run(net, vae, (portrait, audio, emotion), _settings())
    assert unet_rows == [2, 2] + [2, 1] * 2  # clip 0 is all calm at strength 1: released guidance
    assert ref_rows == [2, 2, 2 * MOTION, 2 * MOTION]


@pytest.mark.parametrize("text,expected", [("terrified @1.6", ("terrified", 1.6)), ("terrified", ("terrified", 1.0)),
                                           ("calm and warm @ .7 ", ("calm and warm", 0.7)),
                                           ("at home @home", ("at home @home", 1.0)), ("@2", ("", 2.0))])
def test_segment_text_carries_its_strength_after_an_at(text, expected):
    """Schedule strings: "4-9 s: terrified @1.6"; an @ followed by anything but a number is prompt text."""
    assert split_strength(text) == expected


# ------------------------------------------------------------------------------------- bad values

@pytest.mark.parametrize("value,message", [(math.nan, "emotion_cfg: nan is not a finite number"),
                                           (-0.5, "emotion_cfg: -0.5 is negative"),
                                           (1e6, "emotion_cfg: 1e+06 is above 20"),
                                           ("6", "emotion_cfg: '6' is not a number")])
def test_bad_emotion_cfg_is_one_line_before_any_work(value, message):
    assert emotion_cfg_problem(value).startswith(message) and "\n" not in emotion_cfg_problem(value)
    with pytest.raises(ValueError, match=re.escape(message)):
        check_settings(_settings(emotion_cfg=value))
    # iter_clips checks before it touches the network (here an object without parameters)
    with pytest.raises(ValueError, match=re.escape(message)):
        next(iter_clips(object(), None, *_inputs(1), _settings(emotion_cfg=value)))
    assert emotion_cfg_problem(0) is None and emotion_cfg_problem(20.0) is None


@pytest.mark.parametrize("text,message", [("scared @nan", "strength: nan is not a finite number"),
                                          ("scared @-1", "strength: -1 is negative"),
                                          ("scared @9", "strength: 9 is above 4"),
                                          ("scared @1.6x", "strength: '1.6x' after '@' is not a number")])
def test_bad_segment_strength_is_one_line(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        split_strength(text)


@pytest.mark.parametrize("value,message", [(math.inf, "strength: inf is not a finite number"),
                                           (-1.0, "strength: -1 is negative"), (50.0, "strength: 50 is above 4")])
def test_bad_strength_is_one_line_before_any_work(value, message):
    assert strength_problem(value).startswith(message)
    portrait, audio, emotion = _inputs(1)
    bad = Emotion(emotion.cond, emotion.uncond, torch.tensor([1.0, value, 1.0, 1.0]))
    with pytest.raises(ValueError, match=re.escape(message)):
        next(iter_clips(object(), None, portrait, audio, bad, _settings()))


# ------------------------------------------------------------------------------------- CLI and batch

def test_cli_and_batch_take_emotion_cfg_and_segment_strengths(tmp_path):
    """`generate --emotion-cfg` and `--segment START:END:TEXT @STRENGTH`; the batch's emotion_cfg column,
    `START-END s: text @STRENGTH` schedules (the Emotion Schedule node's preview) and "strength" entries."""
    from emocast_lib.batch import read_jobs
    from emocast_lib.cli import build_parser
    from emocast_lib.jobs import Segment

    args = build_parser().parse_args(["generate", "--emotion-cfg", "6", "--segment", "0:1:calm @0.7",
                                      "--segment", "1:2:A terrified portrait. @1.6"])
    assert args.emotion_cfg == 6.0
    assert args.schedule == [Segment("calm", 0, 1, 0.7), Segment("A terrified portrait.", 1, 2, 1.6)]
    assert build_parser().parse_args(["generate"]).emotion_cfg is None  # unset: the same as cfg
    base = {"image": "a.png", "audio": "a.wav", "out": "a.mp4"}
    rows = [{**base, "emotion": '0-1 s: "calm" @0.7 | 1-2 s: terrified @1.6', "emotion_cfg": 6},
            {**base, "emotion": [{"text": "calm", "start": 0, "end": 1, "strength": 0.7},
                                 {"text": "terrified", "start": 1, "end": 2}]},
            {**base, "emotion": "0-1 s: calm @9"}, {**base, "emotion": "calm", "emotion_cfg": -2}]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scheduled, entries, bad_strength, bad_cfg = read_jobs(jobs)
    assert scheduled.values["schedule"] == (Segment("calm", 0, 1, 0.7), Segment("terrified", 1, 2, 1.6))
    assert scheduled.values["emotion_cfg"] == 6
    assert entries.values["schedule"] == (Segment("calm", 0, 1, 0.7), Segment("terrified", 1, 2))
    assert bad_strength.error.startswith("emotion: schedule part 1 '0-1 s: calm @9': strength: 9 is above 4")
    assert bad_cfg.error == "emotion_cfg: -2 is out of range; use a value from 0.0 to 20.0"


@pytest.mark.parametrize("args,message", [
    (["--emotion-cfg", "nan"], "error: --emotion-cfg: nan is not a finite number"),
    (["--emotion-cfg", "-0.5"], "error: --emotion-cfg: -0.5 is out of range"),
    (["--segment", "0:1:calm @-1"], "strength: -1 is negative")])
def test_cli_bad_values_are_one_line_before_any_model_loads(args, message, tiny_models, tmp_path, capsys,
                                                            monkeypatch):
    from emocast_lib.cli import main
    from emocast_lib.jobs import Session

    monkeypatch.setattr(Session, "_load", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["generate", "--models", str(tiny_models), *args, "--out", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.slow
def test_a_cli_job_guides_each_frame_by_its_segment_strength(tiny_models, tmp_path, monkeypatch):
    """generate with --emotion-cfg and strengths: the sampler gets emotion_cfg and per-frame strengths
    that follow the prompts' crossfade, and runs the neutral half; the batch record names both."""
    import soundfile

    from emocast_lib.batch import settings_record
    from emocast_lib.cli import build_parser, main
    from emocast_lib.jobs import JobSpec, ModelSettings, check_job, run

    wave, rate = soundfile.read(ROOT / "example_workflows" / "inputs" / "emocast_speech.wav", dtype="float32")
    speech = tmp_path / "speech.wav"
    soundfile.write(speech, wave[: int(0.6 * rate)], rate)
    seen = {}
    real = run.iter_clips

    def spy(net, vae, portrait, audio, emotion, settings, **kw):
        seen.update(emotion=emotion, settings=settings, rows=[])
        hook = net.denoising_unet.register_forward_hook(lambda m, a, o: seen["rows"].append(a[0].shape[0]))
        try:
            yield from real(net, vae, portrait, audio, emotion, settings, **kw)
        finally:
            hook.remove()

    monkeypatch.setattr(run, "iter_clips", spy)
    args = ["--segment", "0:0.2:A calm portrait.", "--segment", "0.3:0.6:A terrified portrait. @1.6"]
    assert main(["generate", "--models", str(tiny_models), "--audio", str(speech), "--steps", "2", "--emotion-cfg",
                 "5", "--crossfade", "0.2", *args, "--out", str(tmp_path / "o.mp4")]) == 0
    assert (tmp_path / "o.mp4").is_file() and seen["settings"].emotion_cfg == 5.0
    assert seen["rows"] == [2, 1, 2, 1]
    emotion = seen["emotion"]
    calm, scared = emotion.cond[0], emotion.cond[-1]
    mix = ((emotion.cond - calm) * (scared - calm)).sum((1, 2)) / (scared - calm).pow(2).sum()  # weight of "scared"
    assert mix.min() == 0 and mix.max() == 1 and ((mix > 0) & (mix < 1)).any()  # the crossfade is in the video
    torch.testing.assert_close(emotion.strength, 1 + 0.6 * mix, rtol=0, atol=1e-5)
    spec = JobSpec(ROOT / "example_workflows" / "inputs" / "emocast_portrait.png", speech, tmp_path / "p.mp4",
                   emotion_cfg=5.0, schedule=tuple(build_parser().parse_args(["generate", *args]).schedule))
    record = settings_record(check_job(spec, tiny_models), ModelSettings(models=tiny_models), {})
    assert record["emotion_cfg"] == 5.0 and [s.get("strength", 1.0) for s in record["schedule"]] == [1.0, 1.6]
    released = settings_record(check_job(JobSpec(spec.image, speech, spec.out), tiny_models),
                               ModelSettings(models=tiny_models), {})
    assert "emotion_cfg" not in released  # unset: as in records made before it existed


@pytest.mark.slow
def test_bench_measures_the_neutral_half():
    """`python -m emocast_lib.bench --emotion-cfg`: checked before any work, handed to the sampler, labelled;
    each guided step's calls are the released one then the neutral half's (half the frames)."""
    from emocast_lib.bench import measure as bench
    from emocast_lib.bench.configs import resolve
    from emocast_lib.bench.report import table

    with pytest.raises(SystemExit):
        bench.parse_args(["--emotion-cfg", "nan"])
    args = bench.parse_args(["--config", "tiny", "--runs", "1", "--steps", "2", "--emotion-cfg", "6"])
    bc = resolve("tiny", args)
    assert (bc.emotion_cfg, bc.levers(), bc.sampling().emotion_cfg) == (6.0, "emotion_cfg 6.0", 6.0)
    assert resolve("tiny", bench.parse_args(["--config", "tiny"])).sampling().emotion_cfg is None
    result = bench.measure_config(bc, 1, 1, bench.options(args))
    (clip,) = result["runs"][0]
    assert result["config"]["emotion_cfg"] == 6.0 and len(clip["steps"]) == 4
    assert "[emotion_cfg 6.0]" in table([result | {"summary": bench.summarize(result)}])
