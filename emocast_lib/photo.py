"""Photo files in, face landmarks out: decoding any photo safely, its content digest, and the MediaPipe
landmarker with its native log lines held back. The face geometry itself (masks, crops) is face.py's."""
from __future__ import annotations

import hashlib
import os
import struct
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .face import MAX_FACES, LandmarkDetector

MIN_PHOTO_SIDE = 64
MAX_PHOTO_PIXELS = 90_000_000  # PIL's decompression-bomb threshold, about 9500 x 9500


def load_photo(path: str | Path) -> np.ndarray:
    """Any photo PIL reads -> RGB uint8 (H, W, 3), upright (EXIF orientation applied). Greyscale, 16-bit,
    CMYK and palette images are converted; transparency is composited over white. ValueError names the
    file and the fix (missing, empty, not an image, damaged, too large)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; check the path")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a photo file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes); give a photo file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PHOTO_PIXELS:
                    raise Image.DecompressionBombError(f"{w}x{h} pixels")
                im.load()
                return _to_rgb(ImageOps.exif_transpose(im), path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"{path} is too large to decode safely ({reason(e)}); the limit is "
                             f"{MAX_PHOTO_PIXELS / 1e6:.0f} megapixels: scale it down") from e
        except UnidentifiedImageError as e:
            raise ValueError(f"{path} is not an image PIL can read ({reason(e)}); give a PNG, JPEG or WebP "
                             "photo") from e
        except (OSError, SyntaxError, EOFError, struct.error) as e:
            raise ValueError(f"{path} is damaged or truncated ({reason(e)}); export or download it again") from e


def _to_rgb(im: Image.Image, path: Path) -> np.ndarray:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit or float greyscale
        grey = np.asarray(im, np.float64)
        if grey.max(initial=0) > 255:
            grey = grey / 257
        grey = np.clip(np.round(grey), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB")).copy()
    try:
        return np.asarray(im.convert("RGB")).copy()
    except ValueError as e:
        raise ValueError(f"{path} uses the colour mode {im.mode}, which cannot be converted to RGB; save it as an "
                         "RGB PNG or JPEG") from e


def reason(e: BaseException) -> str:
    """An exception as a short clause for an error line: its type and the first line of its text."""
    text = str(e).splitlines()[0][:160] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes: the cache key of an input."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def native_stderr_quiet() -> Iterator[None]:
    """Hold back what native libraries print on file descriptor 2 (MediaPipe's TFLite and absl notes on
    every landmarker start); it is printed after all if the block fails other than with a ValueError
    (an input problem, reported on its own)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except ValueError:
            raise
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class QuietLandmarker:
    """face.LandmarkDetector on a `.task` bundle, opened once, whose native log lines are held back
    (native_stderr_quiet). `landmarker(rgb)` -> (478, 2) pixels; ValueError when there is no face.
    `landmarker.faces(rgb)`: every face (a conversation's), from a second detector opened on first use."""

    def __init__(self, task: Path):
        self.task, self.several = Path(task), None
        with native_stderr_quiet():
            self.detector = LandmarkDetector(task)

    def faces(self, rgb: np.ndarray) -> list[np.ndarray]:
        """The landmarks of up to face.MAX_FACES faces, MediaPipe's clearest first (empty: no face)."""
        with native_stderr_quiet():
            if self.several is None:
                self.several = LandmarkDetector(self.task, num_faces=MAX_FACES)
            return self.several.faces(rgb)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        with native_stderr_quiet():
            try:
                return self.detector(rgb)
            except ValueError:
                raise ValueError("no face found; use a photo with one clear, frontal face") from None

    def close(self) -> None:
        self.detector.close()
        if self.several is not None:
            self.several.close()
