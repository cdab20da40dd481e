"""EmoCAST Sampler: the temporal sampler, clip by clip, with ComfyUI progress, previews and interrupt."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import comfy.latent_formats
import comfy.model_management as mm
import comfy.utils
import folder_paths
import latent_preview
import torch
from comfy.cli_args import args
from comfy_api.latest import io, ui

from emocast_lib.checkpoint import STEPS_KEY
from emocast_lib.config import SamplingConfig
from emocast_lib.emotion import emotion_cfg_problem
from emocast_lib.jobs.schema import JobError, sampling_config, widget
from emocast_lib.pipeline import AudioWindows, ClipResult, Emotion, iter_clips, make_portrait, num_clips
from emocast_lib.sampling import GenerationCancelled
from emocast_lib.video import Mp4Writer

from .convert import comfy_vae, frames_to_image, latents_to_comfy, to_uint8
from .loaders import compute_dtype
from .sockets import EmoCASTAudio, EmoCASTEmotion, EmoCASTFace, EmoCASTModel
from .types import AudioCond, EmoCASTInputError, EmotionCond, FaceInfo


def check_inputs(net, face: FaceInfo, audio: AudioCond, emotion: EmotionCond) -> None:
    """Mismatches between the pieces, named by input, before any heavy work."""
    cfg = net.config
    h, w = face.image.shape[:2]
    if h != w:
        raise EmoCASTInputError(f"face: the portrait EmoCAST Face Analysis analysed is {w}x{h}; EmoCAST takes a "
                                f"square, face-centred portrait. Put an EmoCAST Crop Portrait node (size "
                                f"{cfg.sample_size}) before Face Analysis")
    if h < cfg.sample_size // 2:
        raise EmoCASTInputError(f"face: the portrait is only {w}x{h} pixels, less than half the {cfg.sample_size}px "
                                f"the model works at; use a larger photo through EmoCAST Crop Portrait (size "
                                f"{cfg.sample_size})")
    layers, channels = audio.windows.shape[-2:]
    if (layers, channels) != (cfg.audio_proj.layers, cfg.audio_proj.channels):
        raise EmoCASTInputError(f"emocast_audio: has {layers} layers x {channels} channels of wav2vec2 features; "
                                f"this model takes {cfg.audio_proj.layers} x {cfg.audio_proj.channels}. Use the "
                                "wav2vec2 model released with this EmoCAST checkpoint (wav2vec2-base-960h)")
    if emotion.width != cfg.unet.cross_attention_dim:
        raise EmoCASTInputError(f"emotion: is {emotion.width} wide; this model takes {cfg.unet.cross_attention_dim} "
                                "(CLIP-L). Encode the emotion with clip_l in Load CLIP, type stable_diffusion")
    if face.identity is not None and face.identity.shape[-1] != cfg.image_proj.embedding_dim:
        raise EmoCASTInputError(f"face: identity embedding has {face.identity.shape[-1]} values; this model "
                                f"takes {cfg.image_proj.embedding_dim}")


def weight_input(name: str, tooltip: str) -> io.Float.Input:
    return io.Float.Input(name, **widget(name), step=0.05, round=0.01, tooltip=tooltip)  # the CLI's and batch's range


def lever_inputs() -> list[io.Input]:
    """The experimental speed levers; they come last in both samplers so that widget values saved by
    workflows from before them stay aligned."""
    return [
        io.Combo.Input("scheduler", **widget("scheduler"), optional=True,
                       tooltip="Experimental speed lever: the sampler. ddim is the released one; dpmpp_2m and "
                               "uni_pc aim at its result in fewer steps (judge the output yourself)."),
        io.Float.Input("cfg_end", **widget("cfg_end"), step=0.05, round=0.01, optional=True,
                       tooltip="Experimental speed lever: guidance for this fraction of the steps only, the rest "
                               "runs half the batch. 1 is the released setting."),
        io.Int.Input("cache_interval", **widget("cache_interval"), optional=True,
                     tooltip="Experimental speed lever: a full network pass every N steps, reusing its deep "
                             "features in between (DeepCache). 1 is the released setting."),
    ]


# The emotion_cfg widget's "not set": the same as cfg (a widget always holds a number).
SAME_AS_CFG = -1.0


def emotion_cfg_input() -> io.Input:
    """After the levers in both samplers, so that widget values saved by workflows from before it stay aligned."""
    # the schema's range, and below it the "not set" value (the schema's default, None, is no widget value)
    return io.Float.Input("emotion_cfg", default=SAME_AS_CFG, min=SAME_AS_CFG, max=widget("emotion_cfg")["max"],
                          step=0.1, round=0.01, optional=True,
                          tooltip="Guidance of the emotion prompt alone: above cfg the emotion shows more, below "
                                  "less, 0 leaves it out of the guidance (an Emotion Schedule's strengths multiply "
                                  "it per segment). -1: the same as cfg, the released guidance. Any other value "
                                  "runs a third half-batch on every guided step (1.5-1.7x the denoising time).")


def emotion_guidance(emotion_cfg: float) -> float | None:
    """The emotion_cfg input -> SamplingConfig.emotion_cfg (None: the same as cfg); a bad one is named."""
    if emotion_cfg == SAME_AS_CFG:
        return None
    problem = emotion_cfg_problem(emotion_cfg, unset=f"{SAME_AS_CFG:g}")
    if problem:
        raise EmoCASTInputError(problem)
    return float(emotion_cfg)


def validate_emotion_cfg(emotion_cfg: float) -> bool | str:
    try:
        emotion_guidance(emotion_cfg)
    except EmoCASTInputError as e:
        return str(e)
    return True


def sampling_inputs() -> list[io.Input]:
    """What both samplers take before their own inputs and the levers."""
    return [
        EmoCASTModel.Input("model", tooltip="From EmoCAST Model Loader."),
        io.Vae.Input("vae", tooltip="SD1.5 VAE (sd-vae-ft-mse) from core Load VAE."),
        EmoCASTFace.Input("face", tooltip="From EmoCAST Face Analysis: the portrait to animate (resized "
                                          "to the model size) and what was found in it."),
        EmoCASTAudio.Input("emocast_audio", tooltip="From EmoCAST Audio Encode: sets the frame count and "
                                                    "fps."),
        EmoCASTEmotion.Input("emotion", tooltip="From EmoCAST Emotion Encode or EmoCAST Emotion "
                                                "Schedule."),
        io.Int.Input("steps", default=0, min=0, max=widget("steps")["max"],  # 0: the checkpoint's count
                     tooltip="Denoising steps per clip. 0: the count the checkpoint declares, else 40 as "
                             "the original (the released EmoCAST declares none: 40; the tiny test "
                             "models declare 4)."),
        io.Float.Input("cfg", **widget("cfg"), step=0.1,
                       round=0.01,
                       tooltip="Guidance scale (3.5 in the original); 1 disables the guidance effect."),
        io.Int.Input("seed", **widget("seed"),
                     control_after_generate=True,
                     tooltip="Seed of the initial noise of every clip."),
        weight_input("pose_weight", "Strength of the audio on head pose (background-mask attention)."),
        weight_input("face_weight", "Strength of the audio on facial expression (face-mask attention)."),
        weight_input("lip_weight", "Strength of the audio on lip motion (lip-mask attention)."),
    ]


class Sampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EmoCASTSampler",
            display_name="EmoCAST Sampler",
            category="EmoCAST",
            description="Generates the talking portrait clip by clip (DDIM, v-prediction, classifier-free "
                        "guidance), each clip continuing from the last frames of the previous one. Progress "
                        "counts clips x steps; Cancel stops within one step.",
            inputs=[*sampling_inputs(), *lever_inputs(), emotion_cfg_input()],
            outputs=[
                io.Image.Output("frames", display_name="frames", tooltip="The video frames, trimmed to the speech."),
                io.Audio.Output("audio", display_name="audio", tooltip="The speech, exactly as long as the frames."),
                io.Float.Output("fps", display_name="fps", tooltip="Frame rate of the frames (for Create Video)."),
                io.Latent.Output("latent", display_name="latent",
                                 tooltip="The frames' latents in ComfyUI's scale (core VAE Decode "
                                         "gives the frames back)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, emotion_cfg: float = SAME_AS_CFG) -> bool | str:
        return validate_emotion_cfg(emotion_cfg)

    @classmethod
    def execute(cls, model, vae, face: FaceInfo, emocast_audio: AudioCond, emotion: EmotionCond, steps: int,
                cfg: float, seed: int, pose_weight: float, face_weight: float, lip_weight: float,
                scheduler: str = SamplingConfig.scheduler, cfg_end: float = SamplingConfig.cfg_end,
                cache_interval: int = SamplingConfig.cache_interval, emotion_cfg: float = SAME_AS_CFG,
                portrait: torch.Tensor | None = None) -> io.NodeOutput:
        # `portrait`: the input before 0.2.0, still linked in workflows saved then (ComfyUI passes it on);
        # unused, the portrait comes with `face`, so those workflows keep running.
        frames, latents = [], []
        levers = (scheduler, cfg_end, cache_interval)
        for clip in sample_clips(model, vae, face, emocast_audio, emotion, steps, cfg, seed,
                                 (pose_weight, face_weight, lip_weight), levers, emotion_cfg):
            frames.append(clip.frames)
            latents.append(clip.latents)
        return io.NodeOutput(frames_to_image(torch.cat(frames)), emocast_audio.audio, float(emocast_audio.fps),
                             latents_to_comfy(torch.cat(latents, dim=2)))


class SamplerToVideo(io.ComfyNode):
    """The sampler for long audio: each clip is encoded into the mp4 as soon as it is decoded, so memory
    stays flat however long the speech is (the Sampler node has to hold every frame for its IMAGE)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EmoCASTSamplerToVideo",
            display_name="EmoCAST Sampler (stream to video file)",
            category="EmoCAST",
            description="Same as EmoCAST Sampler, but writes an mp4 with the speech to ComfyUI's output "
                        "folder clip by clip instead of returning frames: for long audio, memory does not "
                        "grow with its length.",
            inputs=[*sampling_inputs(),
                    io.String.Input("filename_prefix", default="EmoCAST/talking_portrait",
                                    tooltip="Output file name prefix, inside ComfyUI's output folder."),
                    *lever_inputs(), emotion_cfg_input()],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, emotion_cfg: float = SAME_AS_CFG) -> bool | str:
        return validate_emotion_cfg(emotion_cfg)

    @classmethod
    def execute(cls, model, vae, face: FaceInfo, emocast_audio: AudioCond, emotion: EmotionCond, steps: int,
                cfg: float, seed: int, pose_weight: float, face_weight: float, lip_weight: float,
                filename_prefix: str, scheduler: str = SamplingConfig.scheduler,
                cfg_end: float = SamplingConfig.cfg_end, cache_interval: int = SamplingConfig.cache_interval,
                emotion_cfg: float = SAME_AS_CFG, portrait: torch.Tensor | None = None) -> io.NodeOutput:
        # `portrait`: the removed input of workflows saved before 0.2.0 (see Sampler.execute), unused
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory())
        file = f"{name}_{counter:05}_.mp4"
        sound = emocast_audio.audio
        with Mp4Writer(Path(folder) / file, emocast_audio.fps, sound["waveform"][0], int(sound["sample_rate"]),
                       metadata=workflow_metadata(cls.hidden)) as writer:  # the sound keeps its rate and channels
            for clip in sample_clips(model, vae, face, emocast_audio, emotion, steps, cfg, seed,
                                     (pose_weight, face_weight, lip_weight), (scheduler, cfg_end, cache_interval),
                                     emotion_cfg):
                writer.write(clip.frames)
        return io.NodeOutput(ui=ui.PreviewVideo([ui.SavedResult(file, subfolder, io.FolderType.output)]))


def workflow_metadata(hidden) -> dict[str, str]:
    """What core SaveVideo embeds (comfy_extras/nodes_video.py): every extra_pnginfo entry (the UI workflow)
    and the prompt, JSON-encoded, so the mp4 can be dropped back onto ComfyUI; none with --disable-metadata."""
    if args.disable_metadata:
        return {}
    tags = {key: json.dumps(value) for key, value in (hidden.extra_pnginfo or {}).items()}
    if hidden.prompt is not None:
        tags["prompt"] = json.dumps(hidden.prompt)
    return tags


def sample_clips(model, vae, face: FaceInfo, emocast_audio: AudioCond, emotion: EmotionCond, steps: int,
                 cfg: float, seed: int, weights: tuple[float, float, float],
                 levers: tuple[str, float, int], emotion_cfg: float = SAME_AS_CFG) -> Iterator[ClipResult]:
    """Checks, then the library's clip generator with ComfyUI's progress bar, previews and Cancel."""
    net = model.model
    check_inputs(net, face, emocast_audio, emotion)
    try:  # identity None: the library's no-identity embedding (zeros as wide as this model's)
        inputs = make_portrait(to_uint8(face.image), face.landmarks, face.identity, net.config.sample_size,
                               face.expand_ratio)
    except ValueError as e:
        raise EmoCASTInputError(f"face: {e}") from e
    audio = AudioWindows(emocast_audio.windows, emocast_audio.length)
    # 0 steps: the count EmoCAST Model Loader found declared in the checkpoint (kept in the model's options)
    steps = steps or model.model_options.get(STEPS_KEY) or SamplingConfig.steps
    guidance = emotion_guidance(emotion_cfg)  # also here: a linked value is not seen by validate_inputs
    try:
        settings = sampling_config(steps, cfg, seed, weights, emocast_audio.fps, emocast_audio.clip_length, *levers,
                                   guidance)
    except JobError as e:
        raise EmoCASTInputError(str(e)) from e
    cond = emotion.per_frame(emocast_audio.fps, emocast_audio.length)
    strength = emotion.per_frame_strength(emocast_audio.fps, emocast_audio.length)

    mm.load_models_gpu([model])
    total = num_clips(audio, settings) * steps
    pbar = comfy.utils.ProgressBar(total)
    previewer = latent_preview.get_previewer(model.load_device, comfy.latent_formats.SD15())

    def on_step(clip: int, step: int, latents: torch.Tensor) -> None:
        # preview the clip's middle frame; the progress hook raises on Cancel
        preview = None
        if previewer is not None:
            preview = previewer.decode_latent_to_preview_image("JPEG", latents[:, :, latents.shape[2] // 2])
        pbar.update_absolute(clip * steps + step + 1, total, preview)

    try:
        yield from iter_clips(net, comfy_vae(vae), inputs, audio, Emotion(cond, emotion.uncond, strength), settings,
                              on_step=on_step, should_stop=mm.processing_interrupted, device=model.load_device,
                              dtype=compute_dtype(model))
    except GenerationCancelled:
        mm.throw_exception_if_processing_interrupted()
        raise
