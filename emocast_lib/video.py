"""Streaming mp4 writer (PyAV, H.264 + AAC): frames arrive clip by clip and leave memory at once."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch


class Mp4Writer:
    def __init__(self, path: str | Path, fps: int, audio: np.ndarray | None = None, sample_rate: int = 16000,
                 crf: int = 18, metadata: dict[str, str] | None = None):
        """`metadata`: container tags (ComfyUI's prompt/workflow JSON), written as mp4 metadata tags."""
        import av

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._av = av
        self._tmp = self.path.with_name(self.path.name + ".part")
        # use_metadata_tags keeps free-form keys such as "workflow" in the mp4, as ComfyUI's SaveVideo does
        self.container = av.open(str(self._tmp), mode="w", format="mp4", options={"movflags": "use_metadata_tags"})
        self.container.metadata.update(metadata or {})
        self.fps = fps
        self.video = None
        self.crf = crf
        self.audio, self.sample_rate = audio, sample_rate
        self.frames = 0

    def write(self, frames: torch.Tensor) -> None:
        """frames (n, 3, H, W) float in [0, 1]."""
        rgb = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        if self.video is None:
            self.video = self.container.add_stream("libx264", rate=Fraction(self.fps))
            self.video.width, self.video.height = rgb.shape[2], rgb.shape[1]
            self.video.pix_fmt = "yuv420p"
            self.video.options = {"crf": str(self.crf)}
            # Every stream must exist before the first packet is muxed.
            self.sound = self.container.add_stream("aac", rate=self.sample_rate) if self.audio is not None else None
        for img in rgb:
            for packet in self.video.encode(self._av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                self.container.mux(packet)
        self.frames += len(rgb)

    def _write_audio(self) -> None:
        # Trim or pad the sound to the video's duration so players end both together.
        n = round(self.frames * self.sample_rate / self.fps)
        wave = np.zeros((1, n), np.float32)
        mono = np.asarray(self.audio, np.float32).reshape(-1)[:n]
        wave[0, : len(mono)] = mono
        size = self.sound.codec_context.frame_size or 1024
        for start in range(0, n, size):
            frame = self._av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, start:start + size]),
                                                     format="fltp", layout="mono")
            frame.sample_rate, frame.pts = self.sample_rate, start
            self.container.mux(self.sound.encode(frame))
        self.container.mux(self.sound.encode(None))

    def close(self) -> Path:
        if self.video is None:
            raise ValueError(f"no frames were written to {self.path}")
        for packet in self.video.encode(None):
            self.container.mux(packet)
        if self.audio is not None:
            self._write_audio()
        self.container.close()
        self._tmp.replace(self.path)  # a failed run never leaves a truncated mp4 behind
        return self.path

    def abort(self) -> None:
        self.container.close()
        self._tmp.unlink(missing_ok=True)
