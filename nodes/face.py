"""EmoCAST Face Analysis, EmoCAST Crop Portrait and EmoCAST Paste Back."""
from __future__ import annotations

from pathlib import Path

import comfy.model_management as mm
import numpy as np
import torch
from comfy_api.latest import io, ui
from PIL import Image

from emocast_lib import conversation, layout
from emocast_lib import face as face_lib
from emocast_lib.jobs.schema import widget

from . import paths
from .convert import frames_to_image, mask_from_u8, single_image, to_uint8
from .sockets import EmoCASTCropInfo, EmoCASTFace
from .types import EmoCASTInputError, FaceInfo

try:  # core's face landmarks (ComfyUI 0.33.0 and newer); on an older ComfyUI Face Analysis has no such input
    from comfy_extras.nodes_mediapipe import FaceLandmarksType
except ImportError:
    FaceLandmarksType = None

# Masks for the previews only: their shapes do not depend on this size (the sampler makes the
# network's masks at its own size), so the smallest allowed one keeps the node fast.
PREVIEW_MASK_SIZE = 64
# Frames composited per call in Paste Back: the working copy stays small next to the output itself.
PASTE_CHUNK = 16


def face_models_input() -> io.Combo.Input:
    files = ", ".join(Path(f.name).name for f in (*layout.IDENTITY, layout.LANDMARKER))
    return io.Combo.Input("face_models", options=list(paths.face_model_folders()),
                          tooltip=f"Folder in models/{paths.FOLDER}/ with the face models, one file each: {files} "
                                  f"(models/{paths.FOLDER}/{layout.FACE_DIR}/ as in the Hallo/EmoCAST release; "
                                  "the template's missing-models list has their download links)")


def onnx_providers() -> tuple[str, ...]:
    """ONNX Runtime providers for InsightFace on ComfyUI's compute device: CUDA first when ComfyUI runs on an
    NVIDIA GPU and the installed onnxruntime has CUDA (onnxruntime-gpu), as the reference does; else the CPU."""
    if mm.get_torch_device().type == "cuda":
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            return ("CUDAExecutionProvider", "CPUExecutionProvider")
    return ("CPUExecutionProvider",)


def face_folder(name: str) -> Path:
    folder = paths.face_model_folders().get(name)
    if folder is None:
        raise FileNotFoundError(paths.missing_face_models(name))
    return folder


def validate_face_models(face_models: str) -> bool | str:
    if face_models not in paths.face_model_folders():
        return paths.missing_face_models(face_models)
    return True


def detect_faces(folder: Path, rgb: np.ndarray) -> list[np.ndarray]:
    """Every face's landmarks (up to face_lib.MAX_FACES), MediaPipe's clearest first."""
    with face_lib.LandmarkDetector(folder / paths.LANDMARKER_NAME, num_faces=face_lib.MAX_FACES) as detect:
        faces = detect.faces(rgb)
    if not faces:
        raise EmoCASTInputError(f"image: {face_lib.NO_FACE}")
    return faces


def detect_landmarks(folder: Path, rgb: np.ndarray) -> np.ndarray:
    with face_lib.LandmarkDetector(folder / paths.LANDMARKER_NAME) as detect:
        try:
            return detect(rgb)
        except ValueError as e:
            raise EmoCASTInputError(f"image: {e}") from e


def portrait_landmarks(folder: Path, rgb: np.ndarray, face_landmarks: dict | None) -> np.ndarray:
    """Core's landmarks where connected (MediaPipe is then not run), else MediaPipe's."""
    if face_landmarks is None:
        return detect_landmarks(folder, rgb)
    try:
        return face_lib.landmarks_from_core(face_landmarks, *rgb.shape[:2])
    except ValueError as e:
        raise EmoCASTInputError(f"face_landmarks: {e}") from e


def core_landmarks_input() -> list[io.Input]:
    if FaceLandmarksType is None:
        return []
    return [FaceLandmarksType.Input("face_landmarks", optional=True,
                                    tooltip="Optional: landmarks from core Detect Face Landmarks (MediaPipe) run "
                                            "on this same image; its first face is used instead of running "
                                            "MediaPipe here. Unconnected: MediaPipe runs here.")]


class FaceAnalysis(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EmoCASTFaceAnalysis",
            display_name="EmoCAST Face Analysis",
            category="EmoCAST",
            description="Finds the face of the portrait: identity embedding (InsightFace), 478 landmarks "
                        "(MediaPipe) and from them the face-region, face, lip and background masks EmoCAST "
                        "attends with.",
            inputs=[
                io.Image.Input("image", tooltip="The portrait: one square image with one clearly visible face "
                                                "(EmoCAST Crop Portrait makes one). EmoCAST Sampler animates "
                                                "this image, so it is connected here only."),
                face_models_input(),
                io.Float.Input("expand_ratio", **widget("expand_ratio"), step=0.05, round=0.01,
                               tooltip="How far the face mask reaches beyond the face oval (1.2 in the "
                                       "original). Larger allows more head motion."),
                io.Boolean.Input("identity", default=True, label_on="face recognition",
                                 label_off="none (zero embedding)",
                                 tooltip="Identity embedding from face recognition; 'none' uses the zero "
                                         "embedding the original code falls back to when it finds no face."),
                *core_landmarks_input(),
            ],
            outputs=[
                EmoCASTFace.Output("face", display_name="face",
                                   tooltip="The portrait with its landmarks, identity and mask settings, for "
                                           "EmoCAST Sampler."),
                io.Mask.Output("face_region", display_name="face_region",
                               tooltip="Expanded face box (what the face locator sees)."),
                io.Mask.Output("face_mask", display_name="face_mask",
                               tooltip="Soft face mask without the lips (face attention)."),
                io.Mask.Output("lip_mask", display_name="lip_mask", tooltip="Soft lip mask (lip attention)."),
                io.Mask.Output("background_mask", display_name="background_mask",
                               tooltip="Soft background mask, 1 - face (pose attention)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, face_models: str) -> bool | str:
        return validate_face_models(face_models)

    @classmethod
    def execute(cls, image: torch.Tensor, face_models: str, expand_ratio: float, identity: bool,
                face_landmarks: dict | None = None) -> io.NodeOutput:
        portrait = single_image(image, "image")
        rgb = to_uint8(portrait)
        folder = face_folder(face_models)
        landmarks = portrait_landmarks(folder, rgb, face_landmarks)
        embedding, note = None, "identity off: zero embedding"  # the sampler sizes the zeros to its model
        if identity:
            try:
                found = face_lib.face_identity(face_lib.load_face_analysis(folder, onnx_providers()), rgb)
            except ValueError as e:
                raise EmoCASTInputError(f"image: {e}") from e
            embedding, note = np.asarray(found.embedding, np.float32), found.note
        h, w = rgb.shape[:2]
        masks = face_lib.compute_masks(landmarks, h, w, expand_ratio, image_size=PREVIEW_MASK_SIZE)
        info = FaceInfo(portrait.clone(), landmarks, embedding, expand_ratio, note)
        previews = [mask_from_u8(m, h, w) for m in (masks.face_mask, masks.sep_face, masks.sep_lip,
                                                     masks.sep_background)]
        return io.NodeOutput(info, *previews, ui=ui.PreviewText(note))


class CropPortrait(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EmoCASTCropPortrait",
            display_name="EmoCAST Crop Portrait",
            category="EmoCAST",
            description="Any photo -> the square, face-centred portrait EmoCAST expects, at the model size.",
            inputs=[
                io.Image.Input("image", tooltip="A photo, any size or aspect ratio, with one face or several "
                                                "(face_index picks one)."),
                face_models_input(),
                io.Int.Input("size", default=512, min=64, max=2048, step=64,
                             tooltip="Output side in pixels; 512 for the released model (the sampler resizes "
                                     "to the model size anyway)."),
                io.Float.Input("scale", **widget("crop_scale"), step=0.1, round=0.01,
                               tooltip="Crop side relative to the face height: larger keeps more shoulders and "
                                       "background."),
                io.Int.Input("face_index", default=-1, min=-1, max=face_lib.MAX_FACES - 1, optional=True,
                             tooltip="Which face of the photo: 0 is the leftmost, 1 the next to its right, ... "
                                     "(faces found by MediaPipe's face landmarker, ordered by the centre of the "
                                     "face). -1: the clearest face, the one MediaPipe is surest of (the only "
                                     "one in a photo with one face; what this node took before it had an index)."),
            ],
            outputs=[
                io.Image.Output("portrait", display_name="portrait", tooltip="Square face-centred crop, size x size."),
                EmoCASTCropInfo.Output("crop_info", display_name="crop_info",
                                       tooltip="Where the crop lies in the photo and which face it is, for "
                                               "EmoCAST Paste Back."),
            ],
        )

    @classmethod
    def validate_inputs(cls, face_models: str) -> bool | str:
        return validate_face_models(face_models)

    @classmethod
    def execute(cls, image: torch.Tensor, face_models: str, size: int, scale: float,
                face_index: int = -1) -> io.NodeOutput:
        rgb = to_uint8(single_image(image, "image"))
        faces = detect_faces(face_folder(face_models), rgb)
        try:
            crop, where = face_lib.crop_face(rgb, faces, face_index, scale)
        except ValueError as e:
            raise EmoCASTInputError(f"face_index: {e}") from e
        out = np.asarray(Image.fromarray(crop).resize((size, size), Image.LANCZOS))
        pixels = torch.from_numpy(out.astype(np.float32) / 255)[None]
        text = (f"face {where.face_index} of {where.faces} (from the left): {where.side}x{where.side} crop at "
                f"({where.x0}, {where.y0}) -> {size}x{size}")
        return io.NodeOutput(pixels, where, ui=ui.PreviewText(text))


class PasteBack(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EmoCASTPasteBack",
            display_name="EmoCAST Paste Back",
            category="EmoCAST",
            description="Puts the generated portrait video back into the original photo: every frame is "
                        "resized to the crop and blended in where EmoCAST Crop Portrait cut it out, with a "
                        "feathered edge, so the video has the photo's own size and aspect ratio. Chain two for "
                        "a conversation: the second pastes its speaker onto the first one's video.",
            inputs=[
                io.Image.Input("frames", tooltip="The generated frames (EmoCAST Sampler's frames)."),
                EmoCASTCropInfo.Input("crop_info", tooltip="From the EmoCAST Crop Portrait node that made the "
                                                           "portrait."),
                io.Image.Input("photo", tooltip="The photo that EmoCAST Crop Portrait cropped (the same image "
                                                "connected to its input), or a video of it: another Paste "
                                                "Back's frames, so several speakers go into one video. Inside "
                                                "its feathered crop this paste covers what is there (the later "
                                                "paste wins where crops overlap). The longer of the two "
                                                "sequences sets the frame count; the shorter holds its last "
                                                "frame."),
                io.Int.Input("feather", default=16, min=0, max=256,
                             tooltip="Width in pixels of the soft edge over which the frames blend into the "
                                     "photo (0: hard edge). Crop edges on the photo border need no blend."),
            ],
            outputs=[io.Image.Output("pasted", display_name="frames",
                                     tooltip="The frames at the photo's size, for Create Video or the next "
                                             "EmoCAST Paste Back.")],
        )

    @classmethod
    def execute(cls, frames: torch.Tensor, crop_info: face_lib.PortraitCrop, photo: torch.Tensor,
                feather: int) -> io.NodeOutput:
        for name, images in (("photo", photo), ("frames", frames)):
            if images.ndim != 4 or images.shape[-1] not in (3, 4) or len(images) == 0:
                raise EmoCASTInputError(f"{name}: expected a ComfyUI IMAGE batch [frames, height, width, 3], got "
                                        f"shape {tuple(images.shape)}")
        if tuple(photo.shape[1:3]) != (crop_info.photo_height, crop_info.photo_width):
            raise EmoCASTInputError(f"photo: is {photo.shape[2]}x{photo.shape[1]} but crop_info comes from a "
                                    f"{crop_info.photo_width}x{crop_info.photo_height} photo; connect the image "
                                    "that went into EmoCAST Crop Portrait (or a Paste Back's frames of it)")
        background = photo[..., :3].movedim(-1, 1).float()
        total = max(len(frames), len(background))
        out = torch.empty(total, *background.shape[2:], 3)
        for start in range(0, total, PASTE_CHUNK):
            stop = min(start + PASTE_CHUNK, total)
            layer = (frames[..., :3].movedim(-1, 1), crop_info)
            out[start:stop] = frames_to_image(conversation.compose(background, [layer], start, stop, feather))
        onto = "photo" if len(background) == 1 else f"{len(background)}-frame video"
        text = (f"{len(frames)} frame(s) pasted into the {crop_info.photo_width}x{crop_info.photo_height} {onto} "
                f"at ({crop_info.x0}, {crop_info.y0}), {crop_info.side}px, feather {feather}px -> {total} frame(s)")
        return io.NodeOutput(out, ui=ui.PreviewText(text))
