"""EmoCAST Audio Encode and EmoCAST Vocal Separator."""
from __future__ import annotations

import tempfile
from pathlib import Path

import comfy.model_management as mm
import folder_paths
import soundfile
import torch
from comfy_api.latest import io, ui

from emocast_lib import audio as audio_lib
from emocast_lib import layout
from emocast_lib.jobs.schema import widget

from . import paths
from .convert import audio_mono, fit_audio
from .sockets import EmoCASTAudio
from .types import AudioCond, EmoCASTInputError


class CoreWav2Vec2:
    """The library's wav2vec2 stages (audio_lib.Wav2Vec2Stages) over ComfyUI core's AUDIO_ENCODER: the submodules
    of its wav2vec2 driven in the reference's order. Computes in fp32, as core's own encode_audio: its casting ops
    bring the stored weights (fp16 unless ComfyUI runs with --fp32-text-enc) to the input's dtype, and its
    positional convolution is a plain fp32 layer."""

    dtype = torch.float32

    def __init__(self, audio_encoder):
        from comfy.audio_encoders.wav2vec2 import Wav2Vec2Model

        model = getattr(audio_encoder, "model", None)
        if not isinstance(model, Wav2Vec2Model):
            raise EmoCASTInputError(
                f"audio_encoder: is a {type(model).__name__}, not a wav2vec2; load {layout.WAV2VEC.name} from "
                f"models/{layout.WAV2VEC.folder} with Load Audio Encoder (download: {layout.WAV2VEC.source})")
        if model.encoder.do_stable_layer_norm:
            raise EmoCASTInputError(f"audio_encoder: is a large (stable layer norm) wav2vec2; EmoCAST was trained "
                                    f"with wav2vec2-base-960h (download: {layout.WAV2VEC.source})")
        self.model, self.patcher, self.device = model, audio_encoder.patcher, audio_encoder.load_device

    def conv_features(self, wave: torch.Tensor) -> torch.Tensor:
        return self.model.feature_extractor(wave).transpose(1, 2)  # core's encoder returns (1, T, C)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.feature_projection(features)

    def layer_outputs(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model.encoder(hidden)[1][1:]  # (encoder input after its LayerNorm, output of each layer)


class AudioEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EmoCASTAudioEncode",
            display_name="EmoCAST Audio Encode",
            category="EmoCAST",
            description="Speech -> EmoCAST audio features, exactly as the original code computes them (16 kHz "
                        "mono, wav2vec2 features interpolated to one step per video frame, 5-frame windows). "
                        "The video gets ceil(seconds x fps) frames.",
            inputs=[
                io.Audio.Input("audio", tooltip="Speech, any sample rate and channel count (channels are "
                                                 "averaged unless `channel` picks one). Use Load Audio, or EmoCAST "
                                                 "Vocal Separator first for speech over music."),
                io.AudioEncoder.Input("audio_encoder",
                                      tooltip=f"wav2vec2-base-960h from core Load Audio Encoder "
                                              f"(models/{layout.WAV2VEC.folder}/{layout.WAV2VEC.name}; download: "
                                              f"{layout.WAV2VEC.source})."),
                io.Int.Input("fps", **widget("fps"),
                             tooltip="Video frame rate. EmoCAST was trained at 25 fps."),
                io.Int.Input("clip_length", **widget("clip_length"),
                             tooltip="Frames generated per clip (the model was trained with 16). The audio is "
                                     "padded to whole clips and the video trimmed back to the speech."),
                io.Combo.Input("channel", options=list(audio_lib.CHANNELS), default="mix", optional=True,
                               tooltip="Which channel is this speaker's speech: mix (all channels averaged, as the "
                                       "original code reads speech), or one channel of a recording with one "
                                       "speaker per channel (left = channel 1, right = channel 2; 3-8 for "
                                       "multichannel recordings). The audio output is that channel."),
            ],
            outputs=[
                EmoCASTAudio.Output("emocast_audio", display_name="emocast_audio",
                                    tooltip="Audio features, frame count and fps for EmoCAST Sampler."),
                io.Audio.Output("fitted_audio", display_name="audio",
                                tooltip="The input sound (the chosen channel) trimmed/padded to exactly the "
                                        "video's length (frames / fps), for Create Video."),
            ],
        )

    @classmethod
    def execute(cls, audio: dict, audio_encoder, fps: int, clip_length: int, channel: str = "mix") -> io.NodeOutput:
        stages = CoreWav2Vec2(audio_encoder)
        wave, rate = audio_mono(audio)
        try:
            track = audio_lib.pick_channel(wave, channel)
        except ValueError as e:
            raise EmoCASTInputError(f"channel: {e}") from e
        try:
            wave16k = audio_lib.to_16k_mono(track, rate)
            audio_lib.check_length(wave16k, fps)
            mm.load_model_gpu(stages.patcher)
            feats = audio_lib.encode_audio(wave16k, stages, fps, clip_length)
        except ValueError as e:
            raise EmoCASTInputError(f"audio: {e}") from e
        sound = audio if channel == "mix" else {"waveform": torch.from_numpy(track)[None], "sample_rate": rate}
        cond = AudioCond(feats.windowed, feats.audio_length, fps, clip_length,
                         fit_audio(sound, feats.audio_length, fps))
        seconds = len(wave16k) / audio_lib.SAMPLE_RATE
        text = (f"{seconds:.2f} s of speech{'' if channel == 'mix' else f' (channel {channel})'} -> "
                f"{feats.audio_length} frames at {fps} fps ({feats.num_clips} clip(s) of {clip_length})")
        return io.NodeOutput(cond, cond.audio, ui=ui.PreviewText(text))


class MixAudio(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        track = "{} speaker's sound, e.g. the audio output of their EmoCAST Sampler (already as long as their video)."
        return io.Schema(
            node_id="EmoCASTMixAudio",
            display_name="EmoCAST Mix Audio",
            category="EmoCAST",
            description="The sound of a conversation: the speakers' tracks added together, each padded with "
                        "silence to the longest, at the first track's sample rate (others are resampled). "
                        "A mix louder than full scale is scaled down as a whole.",
            inputs=[
                io.Audio.Input("audio_1", tooltip=track.format("The first")),
                io.Audio.Input("audio_2", tooltip=track.format("The second")),
                io.Audio.Input("audio_3", optional=True, tooltip=track.format("A third")),
                io.Audio.Input("audio_4", optional=True, tooltip=track.format("A fourth")),
            ],
            outputs=[io.Audio.Output("mix", display_name="audio",
                                     tooltip="The mix, as long as the longest track, for Create Video.")],
        )

    @classmethod
    def execute(cls, audio_1: dict, audio_2: dict, audio_3: dict | None = None,
                audio_4: dict | None = None) -> io.NodeOutput:
        given = [(f"audio_{i}", a) for i, a in enumerate((audio_1, audio_2, audio_3, audio_4), 1) if a is not None]
        tracks = [audio_mono(a, name) for name, a in given]
        try:
            wave, rate = audio_lib.mix_tracks(tracks)
        except ValueError as e:
            raise EmoCASTInputError(f"audio: {e}") from e
        text = f"{len(tracks)} tracks -> {wave.shape[-1] / rate:.2f} s, {wave.shape[0]} channel(s) at {rate} Hz"
        return io.NodeOutput({"waveform": torch.from_numpy(wave)[None], "sample_rate": rate},
                             ui=ui.PreviewText(text))


class VocalSeparator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EmoCASTVocalSeparator",
            display_name="EmoCAST Vocal Separator",
            category="EmoCAST",
            description="Optional: keeps only the voice (Kim_Vocal_2 MDX model through the audio-separator "
                        "package), as the original code does before encoding speech over music.",
            inputs=[
                io.Audio.Input("audio", tooltip="Sound with speech over music or noise."),
                io.Combo.Input("separator_model", options=list(paths.separator_models()),
                               tooltip=f"Separation model in models/{paths.FOLDER}/{paths.SEPARATOR_DIR}/, next to "
                                       f"audio-separator's download_checks.json, mdx_model_data.json and "
                                       f"vr_model_data.json. Download: {layout.SEPARATOR.source}"),
            ],
            outputs=[io.Audio.Output("vocals", display_name="vocals", tooltip="The separated voice, 16 kHz mono.")],
        )

    @classmethod
    def validate_inputs(cls, separator_model: str) -> bool | str:
        if separator_model not in paths.separator_models():
            return paths.missing_folder("separator_model", separator_model, layout.SEPARATOR)
        return True

    @classmethod
    def execute(cls, audio: dict, separator_model: str) -> io.NodeOutput:
        model = paths.separator_models().get(separator_model)
        if model is None:
            raise FileNotFoundError(paths.missing_folder("separator_model", separator_model, layout.SEPARATOR))
        if model.name != audio_lib.SEPARATOR_MODEL:
            raise EmoCASTInputError(f"separator_model: only {audio_lib.SEPARATOR_MODEL} is supported, got {model.name}")
        wave, rate = audio_mono(audio)
        temp = Path(folder_paths.get_temp_directory())
        temp.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=temp) as tmp:
            src = Path(tmp) / "speech.wav"
            soundfile.write(src, wave.T.cpu().numpy(), rate, subtype="FLOAT")
            vocals = audio_lib.separate_vocals(src, model.parent, Path(tmp) / "out")
            wave16k = audio_lib.load_separated_16k(vocals)
        return io.NodeOutput({"waveform": torch.from_numpy(wave16k)[None, None], "sample_rate": audio_lib.SAMPLE_RATE})
