"""Read, check and convert EmoCAST network checkpoints (`net.pth`, `.safetensors`) without trusting them.

Checkpoints come from the internet, so pickles are only ever read by torch's weights-only unpickler:
a file that needs anything beyond tensors and plain containers is refused before any of it runs.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import NetConfig
from .files import OutputError, atomic_path, output_problem
from .models import EmoCASTNet
from .models.ops import TorchOps

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
# A checkpoint may say what it is: string entries beside its tensors (safetensors metadata, or keys next to
# "state_dict" in a pickle). The released net.pth has none and is the released architecture.
CONFIG_KEY = "emocast_config"  # NetConfig.to_json() of a network of other sizes (the tiny test models)
NOTE_KEY = "emocast_note"  # a warning logged on every load (the tiny test models are not EmoCAST)
STEPS_KEY = "emocast_steps"  # the denoising step count the model is meant to run with, when not 40
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SHOWN = 5  # keys listed per category in a report; the counts tell the rest
GET_NET = "use EmoCAST's released net.pth, or a .safetensors made from it by `python -m emocast_lib convert`"

# Key patterns of checkpoints users are likely to put in the wrong folder (first match wins, so a full
# SD checkpoint, which also holds a VAE and a CLIP, is named by its UNet).
FOREIGN = (
    (r"^model\.diffusion_model\.", "a Stable Diffusion checkpoint", "put it in models/checkpoints instead"),
    (r"^(first_stage_model\.|encoder\.down|decoder\.up|quant_conv\.|taesd_(en|de)coder\.)", "a VAE",
     "put it in models/vae instead"),
    (r"^(cond_stage_model\.|text_model\.|transformer\.text_model\.)", "a CLIP text encoder",
     "put it in models/text_encoders instead"),
    (r"lora_(up|down|A|B)\b|\.lora\.", "a LoRA", "put it in models/loras instead"),
    (r"^(wav2vec2\.|feature_extractor\.conv_layers\.)", "a wav2vec2 audio encoder",
     "put it in models/audio_encoders instead (Load Audio Encoder reads it there)"),
    (r"^(control_model\.|controlnet_)", "a ControlNet", "put it in models/controlnet instead"),
    (r"^(down_blocks|mid_block|up_blocks|conv_in)\.", "a bare UNet or motion-module file",
     "EmoCAST does not use one (net.pth holds both of its UNets)"),
)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file, the problem and the remedy."""


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and (safetensors) metadata of a checkpoint file, on the CPU, loaded without running code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; check the path (models go in models/emocast)")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        obj = _read_pickle(path)
        return _tensors_only(path, obj), _pickle_metadata(obj)
    raise CheckpointError(f"{path}: unsupported file type {suffix!r}; use a .safetensors or "
                          f"{'/'.join(PICKLE_SUFFIXES)} checkpoint")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string entries a checkpoint declares (CONFIG_KEY, NOTE_KEY, STEPS_KEY...), read without loading its
    tensors (safetensors header, or the pickle memory-mapped); also a cheap check that the file is whole."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; check the path (models go in models/emocast)")
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                return dict(f.metadata() or {})
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable .safetensors file, it is truncated or corrupt ({e}); "
                                  "download it again") from e
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _pickle_metadata(_read_pickle(path))
    raise CheckpointError(f"{path}: unsupported file type {path.suffix!r}; use a .safetensors or "
                          f"{'/'.join(PICKLE_SUFFIXES)} checkpoint")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable .safetensors file, it is truncated or corrupt ({e}); "
                              "download it again") from e


def _read_pickle(path: Path) -> object:
    try:
        # mmap needs torch's zip layout; the older plain-pickle layout is read into memory.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"WeightsUnpickler error: (.*?)(?:\. Please use|\n|$)", str(e))
        detail = found.group(1)[:200] if found else "refused by the weights-only unpickler"
        # A truncated pickle can also cut a class name short, so both causes are named.
        raise CheckpointError(f"{path}: refused, the file contains code or objects other than tensors, which were "
                              f"not run ({detail}); {GET_NET}, or download it again if it is an incomplete copy"
                              ) from e
    except Exception as e:  # torch reports damaged files as EOFError, RuntimeError, OSError, KeyError, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, it is truncated or corrupt "
                              f"({_first_sentence(e)}); download it again") from e


def _pickle_metadata(obj: object) -> dict[str, str]:
    """The string entries next to a wrapped state dict ({"state_dict": ..., "emocast_config": "..."})."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
        return {}
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, str)}


def checkpoint_config(path: str | os.PathLike, metadata: Mapping[str, str]) -> NetConfig:
    """The architecture a checkpoint declares (CONFIG_KEY), else the released one."""
    text = metadata.get(CONFIG_KEY)
    if text is None:
        return NetConfig()
    try:
        return NetConfig.from_json_text(text)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: its {CONFIG_KEY} entry is not a valid EmoCAST config ({e}); {GET_NET}") from e


def _first_sentence(e: Exception) -> str:
    text = str(e).split(". ")[0].split("\n")[0][:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _tensors_only(path: Path, obj: object) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        wrapped = next((obj[k] for k in ("state_dict", "module") if isinstance(obj.get(k), Mapping)), None)
        obj = obj if wrapped is None else wrapped
    if not isinstance(obj, Mapping) or len(obj) == 0:
        what = "an empty dict" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise CheckpointError(f"{path}: holds {what}, not a state dict of tensors; {GET_NET}")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items()
           if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(f"{path}: not a state dict of tensors: {len(bad)} of {len(obj)} entries are not, "
                              f"e.g. {', '.join(bad[:SHOWN])}; {GET_NET}")
    return dict(obj)


def check_state_dict(sd: Mapping[str, torch.Tensor], expected: Mapping[str, Sequence[int]], source: str) -> None:
    """Strict key/shape check; raises CheckpointError with a report whose first line stands on its own."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k}: file {tuple(sd[k].shape)}, expected {tuple(expected[k])}"
             for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k])]
    if not (missing or unexpected or wrong):
        return
    hint = next((f" This looks like {what}, not EmoCAST's net.pth; {advice}."
                 for pattern, what, advice in FOREIGN if any(re.search(pattern, k) for k in unexpected)),
                f" It is another model or another version of EmoCAST; {GET_NET}.")
    lines = [f"{source}: does not match the EmoCAST network: {len(missing)} missing, {len(unexpected)} unexpected, "
             f"{len(wrong)} wrong-shape keys ({len(sd)} in the file, {len(expected)} expected).{hint}"]
    for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            more = f" ... and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
            lines.append(f"  {name}: {'; '.join(keys[:SHOWN])}{more}")
    raise CheckpointError("\n".join(lines))


def convert_file(src: str | os.PathLike, dst: str | os.PathLike, dtype: str,
                 expected: Mapping[str, Sequence[int]] | None = None, overwrite: bool = False) -> None:
    """Write `src` as a `.safetensors` with floating tensors cast to `dtype` ("fp16", "bf16" or "fp32").

    An existing `dst` is refused unless `overwrite`. The output appears only once complete (temp file +
    rename), so a failed run never leaves a partial file that a model list would offer."""
    src, dst = Path(src), Path(dst)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if dst.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{dst}: the output must be a .safetensors file")
    if dst.resolve() == src.resolve() or (dst.exists() and src.exists() and dst.samefile(src)):
        raise CheckpointError(f"{dst}: is the source file itself; choose another output name")
    if (problem := output_problem(dst, overwrite)) is not None:
        raise CheckpointError(problem)
    sd, metadata = read_state_dict(src)
    if expected is not None:
        check_state_dict(sd, expected, str(src))
    out = {}
    for key, t in sd.items():
        cast = t.to(DTYPES[dtype]).contiguous() if t.is_floating_point() else t.contiguous()
        if dtype == "fp16" and cast.is_floating_point() and cast.isinf().any() and not t.isinf().any():
            raise CheckpointError(f"{src}: {key} has values beyond the {dtype} range; choose bf16 "
                                  "or fp32 instead")
        out[key] = cast
    try:
        with atomic_path(dst, overwrite) as tmp:
            save_file(out, tmp, metadata={**metadata, "format": "pt", "dtype": dtype, "source": src.name})
    except OutputError as e:
        raise CheckpointError(str(e)) from e
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{dst}: could not be written ({e}); check the folder's free space and "
                              "permissions") from e


def net_shapes(config: NetConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the network of `config`, from the model code on the meta device (no memory used)."""
    return {k: tuple(v.shape) for k, v in EmoCASTNet(config, device="meta").state_dict().items()}


def load_net(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
             config: NetConfig | None = None, operations: type | None = None) -> EmoCASTNet:
    """The network with the weights of `path`, strictly checked, floating tensors in `dtype` on `device`.

    The architecture is `config`, else the one the file declares (CONFIG_KEY), else the released one.
    `operations` is the layer namespace (models/ops.py; default plain torch), e.g. ComfyUI's casting ops."""
    sd, metadata = read_state_dict(path)
    config = config or checkpoint_config(path, metadata)
    check_state_dict(sd, net_shapes(config), str(path))
    net = EmoCASTNet(config, device="meta", operations=operations or TorchOps)
    if metadata.get(NOTE_KEY):
        logging.getLogger("emocast").warning("%s: %s", path, metadata[NOTE_KEY])
    net.load_state_dict({k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in sd.items()},
                        assign=True)
    return net.eval()
