"""EmoCAST Sampler: the temporal sampler, clip by clip, with ComfyUI progress, previews and interrupt."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import comfy.latent_formats
import comfy.model_management as mm
import comfy.utils
import folder_paths
import latent_preview
import torch
from comfy_api.latest import io, ui

from emocast_lib.config import SamplingConfig
from emocast_lib.pipeline import AudioWindows, ClipResult, Emotion, iter_clips, make_portrait, num_clips
from emocast_lib.sampling import GenerationCancelled
from emocast_lib.video import Mp4Writer

from .convert import comfy_vae, frames_to_image, latents_to_comfy, single_image, to_uint8
from .loaders import compute_dtype
from .sockets import Audio, Emotion as EmotionSocket, Face, Model
from .types import AudioCond, EmoCASTInputError, EmotionCond, FaceInfo


def check_inputs(net, portrait: torch.Tensor, face: FaceInfo, audio: AudioCond, emotion: EmotionCond) -> None:
    """Mismatches between the pieces, named by input, before any heavy work."""
    cfg = net.config
    if portrait.shape != face.image.shape or not torch.equal(portrait, face.image.to(portrait.device)):
        raise EmoCASTInputError("portrait: is not the image EmoCAST Face Analysis analysed; connect the same "
                                "image to both nodes")
    h, w = portrait.shape[:2]
    if h != w:
        raise EmoCASTInputError(f"portrait: is {w}x{h}; EmoCAST takes a square, face-centred portrait. Put an "
                                f"EmoCAST Crop Portrait node (size {cfg.sample_size}) before Face Analysis")
    if h < cfg.sample_size // 2:
        raise EmoCASTInputError(f"portrait: is only {w}x{h} pixels, less than half the {cfg.sample_size}px the "
                                f"model works at; use a larger photo through EmoCAST Crop Portrait (size "
                                f"{cfg.sample_size})")
    layers, channels = audio.windows.shape[-2:]
    if (layers, channels) != (cfg.audio_proj.layers, cfg.audio_proj.channels):
        raise EmoCASTInputError(f"emocast_audio: has {layers} layers x {channels} channels of wav2vec2 features; "
                                f"this model takes {cfg.audio_proj.layers} x {cfg.audio_proj.channels}. Use the "
                                "wav2vec2 model released with this EmoCAST checkpoint (wav2vec2-base-960h)")
    if emotion.width != cfg.unet.cross_attention_dim:
        raise EmoCASTInputError(f"emotion: is {emotion.width} wide; this model takes {cfg.unet.cross_attention_dim} "
                                "(CLIP-L). Encode the emotion with clip_l in Load CLIP, type stable_diffusion")
    if face.identity.shape[-1] != cfg.image_proj.embedding_dim:
        raise EmoCASTInputError(f"face: identity embedding has {face.identity.shape[-1]} values; this model "
                                f"takes {cfg.image_proj.embedding_dim}")


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
            inputs=[
                Model.Input("model", tooltip="From EmoCAST Model Loader."),
                io.Vae.Input("vae", tooltip="SD1.5 VAE (sd-vae-ft-mse) from core Load VAE."),
                io.Image.Input("portrait", tooltip="The square portrait, the same image connected to EmoCAST "
                                                   "Face Analysis. Resized to the model size."),
                Face.Input("face", tooltip="From EmoCAST Face Analysis."),
                Audio.Input("emocast_audio", tooltip="From EmoCAST Audio Encode: sets the frame count and fps."),
                EmotionSocket.Input("emotion", tooltip="From EmoCAST Emotion Encode or EmoCAST Emotion Schedule."),
                io.Int.Input("steps", default=40, min=1, max=200,
                             tooltip="Denoising steps per clip (40 in the original)."),
                io.Float.Input("cfg", default=3.5, min=0.0, max=20.0, step=0.1, round=0.01,
                               tooltip="Guidance scale (3.5 in the original); 1 disables the guidance effect."),
                io.Int.Input("seed", default=42, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the initial noise of every clip."),
                io.Float.Input("pose_weight", default=1.0, min=0.0, max=3.0, step=0.05, round=0.01,
                               tooltip="Strength of the audio on head pose (background-mask attention)."),
                io.Float.Input("face_weight", default=1.0, min=0.0, max=3.0, step=0.05, round=0.01,
                               tooltip="Strength of the audio on facial expression (face-mask attention)."),
                io.Float.Input("lip_weight", default=1.0, min=0.0, max=3.0, step=0.05, round=0.01,
                               tooltip="Strength of the audio on lip motion (lip-mask attention)."),
            ],
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
    def execute(cls, model, vae, portrait: torch.Tensor, face: FaceInfo, emocast_audio: AudioCond,
                emotion: EmotionCond, steps: int, cfg: float, seed: int, pose_weight: float, face_weight: float,
                lip_weight: float) -> io.NodeOutput:
        frames, latents = [], []
        for clip in sample_clips(model, vae, portrait, face, emocast_audio, emotion, steps, cfg, seed,
                                 (pose_weight, face_weight, lip_weight)):
            frames.append(clip.frames)
            latents.append(clip.latents)
        return io.NodeOutput(frames_to_image(torch.cat(frames)), emocast_audio.audio, float(emocast_audio.fps),
                             latents_to_comfy(torch.cat(latents, dim=2)))


class SamplerToVideo(io.ComfyNode):
    """The sampler for long audio: each clip is encoded into the mp4 as soon as it is decoded, so memory
    stays flat however long the speech is (the Sampler node has to hold every frame for its IMAGE)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        base = Sampler.define_schema()
        return io.Schema(
            node_id="EmoCASTSamplerToVideo",
            display_name="EmoCAST Sampler (stream to video file)",
            category="EmoCAST",
            description="Same as EmoCAST Sampler, but writes an mp4 with the speech to ComfyUI's output "
                        "folder clip by clip instead of returning frames: for long audio, memory does not "
                        "grow with its length.",
            inputs=[*base.inputs,
                    io.String.Input("filename_prefix", default="EmoCAST/talking_portrait",
                                    tooltip="Output file name prefix, inside ComfyUI's output folder.")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, vae, portrait: torch.Tensor, face: FaceInfo, emocast_audio: AudioCond,
                emotion: EmotionCond, steps: int, cfg: float, seed: int, pose_weight: float, face_weight: float,
                lip_weight: float, filename_prefix: str) -> io.NodeOutput:
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory())
        file = f"{name}_{counter:05}_.mp4"
        sound = emocast_audio.audio
        writer = Mp4Writer(Path(folder) / file, emocast_audio.fps, sound["waveform"][0].mean(0).cpu().numpy(),
                           int(sound["sample_rate"]))
        try:
            for clip in sample_clips(model, vae, portrait, face, emocast_audio, emotion, steps, cfg, seed,
                                     (pose_weight, face_weight, lip_weight)):
                writer.write(clip.frames)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        return io.NodeOutput(ui=ui.PreviewVideo([ui.SavedResult(file, subfolder, io.FolderType.output)]))


def sample_clips(model, vae, portrait: torch.Tensor, face: FaceInfo, emocast_audio: AudioCond,
                 emotion: EmotionCond, steps: int, cfg: float, seed: int,
                 weights: tuple[float, float, float]) -> Iterator[ClipResult]:
    """Checks, then the library's clip generator with ComfyUI's progress bar, previews and Cancel."""
    net = model.model
    image = single_image(portrait, "portrait")
    check_inputs(net, image, face, emocast_audio, emotion)
    try:
        inputs = make_portrait(to_uint8(image), face.landmarks, face.identity, net.config.sample_size,
                               face.expand_ratio)
    except ValueError as e:
        raise EmoCASTInputError(f"portrait: {e}") from e
    audio = AudioWindows(emocast_audio.windows, emocast_audio.length)
    settings = SamplingConfig(steps=steps, cfg_scale=cfg, frames_per_clip=emocast_audio.clip_length,
                              fps=emocast_audio.fps, motion_scale=weights, seed=seed)
    cond = emotion.per_frame(emocast_audio.fps, emocast_audio.length)

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
        yield from iter_clips(net, comfy_vae(vae), inputs, audio, Emotion(cond, emotion.uncond), settings,
                              on_step=on_step, should_stop=mm.processing_interrupted, device=model.load_device,
                              dtype=compute_dtype(model))
    except GenerationCancelled:
        mm.throw_exception_if_processing_interrupted()
        raise
