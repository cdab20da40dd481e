"""Face inputs of EmoCAST: landmarks, region/attention masks, identity embedding, portrait crop.

Upstream: Hallo's hallo/datasets/image_processor.py (ImageProcessor.preprocess) with the mask helpers of
hallo/utils/util.py (get_mask, get_blur_mask, ...); the fixture spec is tests/fixtures/preprocess/README.md.
Masks follow its §2.3 stage by stage, uint8 wherever the reference is uint8
(OpenCV resize/blur/min-max, PIL bilinear resizes), so they match it exactly. One deliberate
deviation (edge case 2.3.4): when the expanded face box is larger than the image, the reference ends
with a negative box start and Python slicing turns the mask into a strip at the far edge; here the
box is clamped into the image (`clamp_box=True`), so the mask covers the whole face.
MediaPipe and InsightFace are imported only by the functions that need them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from .config import MAX_FACES

__all__ = [
    "FACE_OVAL_IDS", "LIP_IDS", "FaceMasks", "expand_box", "rect_mask", "soft_mask", "compute_masks",
    "mask_sizes", "resize_u8", "reference_image", "landmarks_to_pixels", "landmarks_from_core", "LandmarkDetector",
    "MAX_FACES", "pick_face", "Identity", "load_face_analysis", "face_identity", "PortraitCrop", "crop_portrait",
    "crop_face", "feather_mask", "paste_back",
]

# MediaPipe 478-point face mesh indices used by the reference (face oval, outer lip contour).
FACE_OVAL_IDS = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
                 152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
LIP_IDS = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 146, 91, 181, 84, 17, 314, 405, 321, 375)
LIP_EXPAND_RATIO = 2.0
MASK64 = 64
FACE_KSIZE, LIP_KSIZE = 51, 31
# The reference inverts the blurred face mask in float64 and truncates: 254 - v for 50 of 256 values.
_BACKGROUND_LUT = ((1.0 - np.arange(256) / 255.0) * 255).astype(np.uint8)


def expand_box(points: np.ndarray, ratio: float, width: int, height: int,
               clamp: bool = True) -> tuple[list[float], list[int]]:
    """Landmark subset (N, 2) px -> ([min_x, max_x, min_y, max_y] rounded, [x0, x1, y0, y1] expanded box).

    Reference rule: centre floor((max+min)/2), half side floor((max-min)*ratio/2), shifted into the
    image (start first, then end). `clamp=False` keeps the reference's possibly negative start.
    """
    pts = np.asarray(points, np.float64)
    box_in, box_out = [], []
    for axis, size in ((0, width), (1, height)):
        lo_v, hi_v = float(np.round(pts[:, axis].min())), float(np.round(pts[:, axis].max()))
        mid, half = math.floor((hi_v + lo_v) / 2), math.floor((hi_v - lo_v) * ratio / 2)
        lo, hi = mid - half, mid + half
        if lo < 0:
            hi, lo = hi - lo, 0
        if hi > size:
            lo, hi = lo - (hi - size), size
        box_in += [lo_v, hi_v]
        box_out += [max(lo, 0) if clamp else lo, hi]
    return box_in, [int(v) for v in box_out]


def rect_mask(box: list[int], height: int, width: int) -> np.ndarray:
    """(H, W) uint8, 255 inside rows y0:y1 and columns x0:x1 (Python slice semantics, as the reference)."""
    x0, x1, y0, y1 = box
    mask = np.zeros((height, width), np.uint8)
    mask[y0:y1, x0:x1] = 255
    return mask


def soft_mask(mask: np.ndarray, ksize: int) -> np.ndarray:
    """uint8 mask -> 64x64 uint8: OpenCV bilinear resize, Gaussian blur (sigma from ksize), min-max 0..255."""
    small = cv2.resize(mask, (MASK64, MASK64))
    blurred = cv2.GaussianBlur(small, (ksize, ksize), 0)
    return cv2.normalize(blurred, None, 0, 255, cv2.NORM_MINMAX)


def resize_u8(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) -> (size, size[, 3]) with PIL bilinear, aspect not kept (torchvision Resize)."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def mask_sizes(image_size: int) -> tuple[int, ...]:
    """Latent-grid sides of the four UNet resolutions: image_size/8 / 2^l (64, 32, 16, 8 at 512 px)."""
    if image_size % 64:
        raise ValueError(f"image size must be a multiple of 64, got {image_size}")
    return tuple(image_size // 8 >> level for level in range(4))


@dataclass
class FaceMasks:
    """Everything the network needs from the face landmarks (uint8 intermediates kept for checks)."""

    lip_box: list[int]            # [x0, x1, y0, y1] in image pixels
    face_box: list[int]
    lip_mask: np.ndarray          # (H, W) uint8 0/255
    face_mask: np.ndarray         # (H, W) uint8 0/255
    face_mask_blur: np.ndarray    # (64, 64) uint8
    sep_lip: np.ndarray           # (64, 64) uint8
    sep_face: np.ndarray          # (64, 64) uint8 face minus lips
    sep_background: np.ndarray    # (64, 64) uint8
    face_region: torch.Tensor     # (3, S, S) float32 0..1 for the face locator
    full_masks: dict[int, torch.Tensor] = field(default_factory=dict)  # side -> (1, side*side) float32
    face_masks: dict[int, torch.Tensor] = field(default_factory=dict)
    lip_masks: dict[int, torch.Tensor] = field(default_factory=dict)


def _flat(mask64: np.ndarray, side: int) -> torch.Tensor:
    return torch.from_numpy(resize_u8(mask64, side).astype(np.float32) / 255).reshape(1, -1)


def compute_masks(landmarks: np.ndarray, height: int, width: int, expand_ratio: float = 1.2,
                  image_size: int = 512, clamp_box: bool = True) -> FaceMasks:
    """(478, 2) pixel landmarks of an H x W image -> FaceMasks (spec §2.3 steps 1-8).

    Attention masks are made at `mask_sizes(image_size)`; `clamp_box=False` reproduces the
    reference's strip-shaped mask when the expanded face box exceeds the image (§2.3.4).
    """
    lm = np.asarray(landmarks, np.float64)
    if lm.ndim != 2 or lm.shape[0] < 478 or lm.shape[1] < 2:
        raise ValueError(f"landmarks must be (478, 2) pixel coordinates, got shape {lm.shape}")
    if not np.isfinite(lm[:, :2]).all():
        raise ValueError("landmarks contain NaN or infinite values")
    _, lip_box = expand_box(lm[list(LIP_IDS), :2], LIP_EXPAND_RATIO, width, height, clamp_box)
    _, face_box = expand_box(lm[list(FACE_OVAL_IDS), :2], expand_ratio, width, height, clamp_box)
    lip_mask, face_mask = rect_mask(lip_box, height, width), rect_mask(face_box, height, width)
    face_blur, sep_lip = soft_mask(face_mask, FACE_KSIZE), soft_mask(lip_mask, LIP_KSIZE)
    sep_face = cv2.subtract(face_blur, sep_lip)
    sep_background = _BACKGROUND_LUT[face_blur]
    region = torch.from_numpy(resize_u8(face_mask, image_size).astype(np.float32) / 255)
    sides = mask_sizes(image_size)
    return FaceMasks(
        lip_box=lip_box, face_box=face_box, lip_mask=lip_mask, face_mask=face_mask,
        face_mask_blur=face_blur, sep_lip=sep_lip, sep_face=sep_face, sep_background=sep_background,
        face_region=region.expand(3, -1, -1).contiguous(),
        full_masks={s: _flat(sep_background, s) for s in sides},
        face_masks={s: _flat(sep_face, s) for s in sides},
        lip_masks={s: _flat(sep_lip, s) for s in sides},
    )


def reference_image(image: np.ndarray, image_size: int = 512) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> (3, S, S) float32 in [-1, 1], PIL-bilinear resized as the reference."""
    u8 = resize_u8(np.ascontiguousarray(image, np.uint8), image_size)
    return torch.from_numpy((u8.astype(np.float32) / 255 - 0.5) / 0.5).permute(2, 0, 1).contiguous()


# --- landmarks ------------------------------------------------------------------------------------

def landmarks_to_pixels(normalized: np.ndarray, height: int, width: int) -> np.ndarray:
    """MediaPipe normalised (N, >=2) -> (N, 2) float64 pixels: x = nx * W, y = ny * H."""
    n = np.asarray(normalized, np.float64)
    return np.stack([n[:, 0] * width, n[:, 1] * height], axis=1)


def landmarks_from_core(payload: dict, height: int, width: int) -> np.ndarray:
    """ComfyUI core's FACE_LANDMARKS (its MediaPipe face landmarker port: {"frames": [[face, ...], ...],
    "image_size": (H, W), ...}, each face's "landmarks_xy" (478, 2) in image pixels, faces in detection order)
    -> the first frame's first face as (478, 2) float64 pixels, what LandmarkDetector gives for an H x W image."""
    size = tuple(int(v) for v in payload.get("image_size", ()))
    if size != (height, width):
        found = f"a {size[1]}x{size[0]}" if len(size) == 2 else "an unknown"
        raise ValueError(f"the landmarks are of {found} image, the portrait is {width}x{height}: detect them on "
                         "the same image that goes into this node")
    frames = payload.get("frames") or [[]]
    if not frames[0]:
        raise ValueError("they hold no face (the landmark detector found none): use a clearer frontal portrait "
                         "or leave the input unconnected")
    points = np.asarray(frames[0][0]["landmarks_xy"], np.float64)
    if points.shape != (478, 2):
        raise ValueError(f"expected 478 (x, y) landmarks per face, got shape {points.shape}")
    return points


NO_FACE = ("no face found for landmarks: use a clearer frontal portrait or crop it to the face (Crop Portrait "
           "node)")


class LandmarkDetector:
    """MediaPipe Tasks FaceLandmarker (IMAGE mode, up to `num_faces` faces) on a `.task` bundle given by the caller.

    Use as a context manager or call `close()`; `detector(rgb_uint8)` -> (478, 2) float64 pixels of the face
    MediaPipe is most sure of, `detector.faces(rgb_uint8)` -> every face found, in MediaPipe's order (the most
    sure first: the first is the one `detector()` gives, whatever `num_faces`).
    """

    def __init__(self, task_path: str | Path, num_faces: int = 1):
        task_path = Path(task_path)
        if not task_path.is_file():
            raise FileNotFoundError(
                f"face landmarker model not found: {task_path}. Put MediaPipe's "
                "face_landmarker_v2_with_blendshapes.task (from the EmoCAST release) there")
        try:
            from mediapipe.tasks.python import BaseOptions, vision
        except ImportError as e:
            raise ImportError("face landmarks need mediapipe: `pip install mediapipe`") from e
        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(task_path)),
            running_mode=vision.RunningMode.IMAGE, num_faces=num_faces)
        try:
            self._landmarker = vision.FaceLandmarker.create_from_options(options)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{task_path} is not a usable MediaPipe FaceLandmarker bundle: {e}") from e

    def __call__(self, image: np.ndarray) -> np.ndarray:
        faces = self.faces(image)
        if not faces:
            raise ValueError(NO_FACE)
        return faces[0]

    def faces(self, image: np.ndarray) -> list[np.ndarray]:
        import mediapipe as mp

        rgb = np.ascontiguousarray(image, np.uint8)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"landmark detection needs an RGB uint8 (H, W, 3) image, got shape {rgb.shape}")
        result = self._landmarker.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=rgb))
        return [landmarks_to_pixels(np.array([(p.x, p.y) for p in face], np.float64), rgb.shape[0], rgb.shape[1])
                for face in result.face_landmarks]

    def close(self) -> None:
        self._landmarker.close()

    def __enter__(self) -> "LandmarkDetector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pick_face(faces: list[np.ndarray], index: int = -1) -> tuple[np.ndarray, int]:
    """The landmarks of face `index` counted from the left (0 = leftmost, by the centre of the face oval), or
    with -1 the first of `faces` (MediaPipe's most sure face, as `LandmarkDetector()` gives) -> (landmarks,
    its left-to-right position). ValueError naming the count when there is no such face."""
    if not faces:
        raise ValueError(NO_FACE)
    centres = [float(np.mean(f[list(FACE_OVAL_IDS), 0])) for f in faces]
    order = sorted(range(len(faces)), key=lambda i: (centres[i], i))
    if index == -1:
        return faces[0], order.index(0)
    if not 0 <= index < len(faces):
        numbers = "0" if len(faces) == 1 else f"0 to {len(faces) - 1}"
        raise ValueError(f"there is no face {index}: {len(faces)} face(s) found in the photo, numbered {numbers} "
                         "from left to right")
    return faces[order[index]], index


# --- identity -------------------------------------------------------------------------------------

@dataclass
class Identity:
    embedding: np.ndarray   # (512,) raw ArcFace embedding (float32), zeros float64 without a face
    bbox: np.ndarray | None  # chosen face [x1, y1, x2, y2] in image pixels
    num_faces: int
    note: str               # which face was used, for the node's UI / logs


def load_face_analysis(models_dir: str | Path, providers: tuple[str, ...] = ("CPUExecutionProvider",)):
    """InsightFace FaceAnalysis on an absolute folder of ONNX models (antelopev2), detection +
    recognition only, det size 640 as the reference."""
    models_dir = Path(models_dir).expanduser().resolve()
    if not models_dir.is_dir() or not any(models_dir.glob("*.onnx")):
        raise FileNotFoundError(f"no InsightFace models in {models_dir}: it must hold antelopev2's "
                                "scrfd_10g_bnkps.onnx and glintr100.onnx")
    try:
        from insightface.app import FaceAnalysis
    except ImportError as e:
        raise ImportError("face identity needs the optional package insightface: `pip install --no-deps "
                          "insightface==2.1 && pip install onnxruntime onnx scipy scikit-image tqdm requests` "
                          "(--no-deps keeps its opencv-python from clashing with the installed OpenCV)") from e
    try:
        app = FaceAnalysis(name=str(models_dir), allowed_modules=["detection", "recognition"],
                       providers=list(providers))
    except AssertionError as e:  # insightface asserts when no detector was recognised
        raise ValueError(f"no face detection model (SCRFD) recognised in {models_dir}") from e
    if "recognition" not in app.models:
        raise ValueError(f"no face recognition model (ArcFace, 112x112 input) recognised in {models_dir}")
    app.prepare(ctx_id=0, det_size=(640, 640))
    return app


def face_identity(app, image: np.ndarray, allow_no_face: bool = False) -> Identity:
    """RGB uint8 (H, W, 3) -> Identity of the largest face (first on ties), raw `embedding`.

    No face: ValueError, or with `allow_no_face` the reference's fallback zeros(512) float64.
    """
    rgb = np.asarray(image, np.uint8)
    faces = app.get(np.ascontiguousarray(rgb[..., ::-1]))  # the reference feeds OpenCV's BGR order
    if not faces:
        if allow_no_face:
            return Identity(np.zeros(512, np.float64), None, 0, "no face found: using the zero embedding")
        raise ValueError("no face found in the reference image: use a clearer, frontal portrait, crop it to the "
                         "face with the Crop Portrait node, or enable the 'no identity' option (zero embedding, "
                         "as the original EmoCAST does)")
    areas = [(f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]) for f in faces]
    best = int(np.argmax(areas))  # argmax returns the first maximum, as the reference's sort
    bbox = np.asarray(faces[best].bbox, np.float32)
    note = f"{len(faces)} face(s) found; using face {best + 1} at {np.round(bbox).astype(int).tolist()}"
    if len(faces) > 1:
        note += " (the largest)"
    return Identity(np.asarray(faces[best].embedding, np.float32), bbox, len(faces), note)


# --- portrait crop and paste-back ------------------------------------------------------------------

@dataclass(frozen=True)
class PortraitCrop:
    """Where a square portrait was cut from a photo: what `paste_back` needs to put the video back."""

    x0: int
    y0: int
    side: int
    photo_height: int
    photo_width: int
    face_box: tuple[int, int, int, int]  # expanded face box (x0, x1, y0, y1) in the photo
    face_index: int = 0  # which face of the photo, counted from the left (0 = leftmost)
    faces: int = 1  # how many faces were found in the photo


def crop_portrait(image: np.ndarray, landmarks: np.ndarray, scale: float = 2.0,
                  expand_ratio: float = 1.2) -> tuple[np.ndarray, PortraitCrop]:
    """Square crop around the face: side = scale x the longer face-oval extent, centred on the face,
    shifted into the frame, never smaller than the expanded face box (so masks are not clipped)
    unless the image itself is smaller. Returns (crop, PortraitCrop)."""
    h, w = image.shape[:2]
    pts = np.asarray(landmarks, np.float64)[list(FACE_OVAL_IDS), :2]
    (min_x, max_x, min_y, max_y), face_box = expand_box(pts, expand_ratio, w, h)
    extent = max(max_x - min_x, max_y - min_y)
    side = min(h, w, max(math.ceil(extent * scale), math.ceil(extent * expand_ratio) + 2))
    cx, cy = (min_x + max_x) / 2, (min_y + max_y) / 2
    x0 = int(min(max(round(cx - side / 2), 0), w - side))
    y0 = int(min(max(round(cy - side / 2), 0), h - side))
    return image[y0:y0 + side, x0:x0 + side].copy(), PortraitCrop(x0, y0, side, h, w, tuple(face_box))


def crop_face(image: np.ndarray, faces: list[np.ndarray], index: int = -1, scale: float = 2.0,
              expand_ratio: float = 1.2) -> tuple[np.ndarray, PortraitCrop]:
    """`crop_portrait` around face `index` of `faces` (`pick_face`: counted from the left, -1 the clearest);
    the PortraitCrop records which face it is and how many were found."""
    landmarks, position = pick_face(faces, index)
    crop, where = crop_portrait(image, landmarks, scale, expand_ratio)
    return crop, replace(where, face_index=position, faces=len(faces))


def feather_mask(crop: PortraitCrop, feather: int) -> torch.Tensor:
    """(side, side) float32 blend weight of the pasted crop: 1 inside, a linear ramp over `feather` pixels
    towards each crop edge that lies inside the photo (edges on the photo border need no blend)."""
    side = crop.side
    ramp = torch.clamp((torch.arange(side, dtype=torch.float32) + 1) / (feather + 1), max=1.0)
    ones = torch.ones(side)
    near = [ramp if crop.x0 > 0 else ones, ramp if crop.y0 > 0 else ones]
    far = [ramp.flip(0) if crop.x0 + side < crop.photo_width else ones,
           ramp.flip(0) if crop.y0 + side < crop.photo_height else ones]
    wx, wy = torch.minimum(near[0], far[0]), torch.minimum(near[1], far[1])
    return wy[:, None] * wx[None, :]


def paste_back(photo: torch.Tensor, frames: torch.Tensor, crop: PortraitCrop, feather: int = 16) -> torch.Tensor:
    """Generated frames (n, 3, S, S) in [0, 1] composited into the photo (3, H, W), or frame by frame into a
    background video (n, 3, H, W), in [0, 1] where the crop came from -> (n, 3, H, W). Outside the crop every
    pixel is the background's; inside, the frame (resized to the crop side) blends in over a `feather`-pixel
    edge, covering what was there (so of two overlapping pastes the later one wins inside its mask). Works
    on any batch of frames, so a long video can be pasted clip by clip."""
    if tuple(photo.shape[-3:]) != (3, crop.photo_height, crop.photo_width) or photo.ndim not in (3, 4):
        raise ValueError(f"the photo is {tuple(photo.shape[-2:])[::-1]} (w x h) but the crop was made from a "
                         f"{crop.photo_width}x{crop.photo_height} photo: paste back onto the photo that was cropped")
    if photo.ndim == 4 and len(photo) != len(frames):
        raise ValueError(f"the background video has {len(photo)} frames for {len(frames)} pasted frames; give one "
                         "background frame per frame")
    if feather < 0:
        raise ValueError(f"feather must be >= 0 pixels, got {feather}")
    side, (x0, y0) = crop.side, (crop.x0, crop.y0)
    frames = frames.to(photo.dtype)
    if frames.shape[-2:] != (side, side):
        frames = torch.nn.functional.interpolate(frames, size=(side, side), mode="bilinear", align_corners=False,
                                                 antialias=frames.shape[-1] > side).clamp(0, 1)
    alpha = feather_mask(crop, min(feather, side // 2)).to(photo.dtype)
    out = photo.clone() if photo.ndim == 4 else photo[None].repeat(len(frames), 1, 1, 1)
    region = out[:, :, y0:y0 + side, x0:x0 + side]
    out[:, :, y0:y0 + side, x0:x0 + side] = region * (1 - alpha) + frames * alpha
    return out
