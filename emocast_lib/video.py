"""Streaming mp4 writer (PyAV, H.264 + AAC): frames arrive clip by clip and leave memory at once.

The one home of the write/abort/close sequence for the CLI and the stream-to-video node:

    with Mp4Writer(path, fps, sound, sample_rate) as writer:
        for clip in clips:
            writer.write(clip.frames)
    # complete file at `path`; on an exception (Cancel, Ctrl-C, an error) nothing is left behind

The file is written under a hidden temporary name and renamed when complete (see `files`).
The sound is the caller's, at its own sample rate and channel count, trimmed or zero-padded to the
video's duration.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from types import TracebackType

import numpy as np
import torch

from .files import check_output, partial_path, publish, remove_stale_partials

# The sample rates AAC defines; other rates are resampled to the next one up (48 kHz at most).
AAC_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)
# Channel layouts the AAC encoder takes; a sound with more channels is mixed down to stereo.
_LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "4.0", 5: "5.0", 6: "5.1", 7: "6.1"}


class Mp4Writer:
    def __init__(self, path: str | Path, fps: int, audio: np.ndarray | torch.Tensor | None = None,
                 sample_rate: int = 16000, crf: int = 18, overwrite: bool = False,
                 metadata: dict[str, str] | None = None):
        """`audio`: float samples in [-1, 1], (samples,) or (channels, samples), at `sample_rate`; louder
        samples are clipped. `metadata`: container tags (e.g. comment, or ComfyUI's prompt/workflow JSON)
        stored in the file itself. Raises files.OutputError when `path` cannot be written (exists, a folder...)."""
        import av

        self._av = av
        self.path = Path(path)
        self.fps, self.crf = fps, crf
        self.audio = None if audio is None else _as_channels(audio)
        self.sample_rate, self.overwrite = int(sample_rate), overwrite
        check_output(self.path, overwrite)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.path)
        self._tmp = partial_path(self.path)
        # A file object of our own: the temporary file exists from here on (FFmpeg would create it only with
        # the first packet), so an interrupted run can be cleaned up whatever the encoder buffered.
        self._file = open(self._tmp, "wb")
        try:
            # use_metadata_tags keeps free-form keys (ComfyUI's "prompt"/"workflow") as ComfyUI's SaveVideo does
            self.container = av.open(self._file, mode="w", format="mp4", options={"movflags": "use_metadata_tags"})
        except BaseException:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            raise
        self.container.metadata.update(metadata or {})
        self.video = None
        self.frames = 0

    def write(self, frames: torch.Tensor) -> None:
        """frames (n, 3, H, W) float in [0, 1]. An odd width or height is padded by one edge pixel (H.264's
        4:2:0 needs even sides)."""
        rgb = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        if rgb.shape[1] % 2 or rgb.shape[2] % 2:
            rgb = np.pad(rgb, ((0, 0), (0, rgb.shape[1] % 2), (0, rgb.shape[2] % 2), (0, 0)), mode="edge")
        if self.video is None:
            self.video = self.container.add_stream("libx264", rate=Fraction(self.fps))
            self.video.width, self.video.height = rgb.shape[2], rgb.shape[1]
            self.video.pix_fmt = "yuv420p"
            # Same frames, same bytes: x264's macroblock-tree rate control (mbtree) now and then encoded
            # identical frames differently (x264 core 165 in PyAV 18.1, measured), so it is off.
            self.video.options = {"crf": str(self.crf), "x264-params": "mbtree=0"}
            # Every stream must exist before the first packet is muxed.
            if self.audio is not None:
                self.sound_rate = next((r for r in AAC_RATES if r >= self.sample_rate and r <= 48000), 48000)
                self.sound = self.container.add_stream("aac", rate=self.sound_rate,
                                                       layout=_LAYOUTS[self.audio.shape[0]])
        for img in rgb:
            frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            for packet in self.video.encode(frame):
                self.container.mux(packet)
        self.frames += len(rgb)

    def _write_audio(self) -> None:
        # Trim or pad the sound to the video's duration so players end both together.
        n = round(self.frames * self.sample_rate / self.fps)
        layout = _LAYOUTS[self.audio.shape[0]]
        resampler = None
        if self.sound_rate != self.sample_rate:
            resampler = self._av.AudioResampler(format="fltp", layout=layout, rate=self.sound_rate)
        size = 4096
        for start in range(0, n, size):
            chunk = np.zeros((self.audio.shape[0], min(size, n - start)), np.float32)
            part = self.audio[:, start:start + chunk.shape[1]]
            chunk[:, :part.shape[1]] = np.clip(part, -1, 1)
            frame = self._av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
            frame.sample_rate, frame.pts = self.sample_rate, start
            for out in (resampler.resample(frame) if resampler else [frame]):
                self.container.mux(self.sound.encode(out))
        if resampler:
            for out in resampler.resample(None):
                self.container.mux(self.sound.encode(out))
        self.container.mux(self.sound.encode(None))

    def close(self) -> Path:
        """Finish the file and move it to its final name; returns that path."""
        try:
            if self.video is None:
                raise ValueError(f"no frames were written to {self.path}")
            for packet in self.video.encode(None):
                self.container.mux(packet)
            if self.audio is not None:
                self._write_audio()
            self.container.close()
            self._file.close()
            publish(self._tmp, self.path, self.overwrite)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Drop the unfinished file; the final name is left as it was."""
        try:
            self.container.close()
        except Exception:  # a container broken mid-write cannot be closed cleanly; it is deleted anyway
            pass
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def _as_channels(audio: np.ndarray | torch.Tensor) -> np.ndarray:
    wave = audio.detach().float().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio, np.float32)
    wave = wave.reshape(1, -1) if wave.ndim == 1 else wave
    if wave.ndim != 2:
        raise ValueError(f"the sound must be (samples,) or (channels, samples), got shape {wave.shape}")
    if wave.shape[0] > max(_LAYOUTS):
        wave = np.stack([wave[0::2].mean(0), wave[1::2].mean(0)])
    return np.nan_to_num(wave.astype(np.float32, copy=False), nan=0.0, posinf=1.0, neginf=-1.0)
