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
from torch import nn

from .config import STORAGE_FORMATS, NetConfig
from .files import OutputError, atomic_path, output_problem
from .models import EmoCASTNet
from .models.ops import CastOps, TorchOps, large_weights

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
# A checkpoint may say what it is: string entries beside its tensors (safetensors metadata, or keys next to
# "state_dict" in a pickle). The released net.pth has none and is the released architecture.
CONFIG_KEY = "emocast_config"  # NetConfig.to_json() of a network of other sizes (the tiny test models)
NOTE_KEY = "emocast_note"  # a warning logged on every load (the tiny test models are not EmoCAST)
STEPS_KEY = "emocast_steps"  # the denoising step count the model is meant to run with, when not 40
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# `convert` also writes the linear/conv weights in an fp8 storage format (halving the file against fp16); the
# other tensors (2.8 M values at the released widths) then stay fp32.
CONVERT_DTYPES = (*DTYPES, *STORAGE_FORMATS)
WEIGHT_DTYPES = ("default", *STORAGE_FORMATS)  # how load_net stores the large layers' weights
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
    """Write `src` as a `.safetensors` with floating tensors cast to `dtype` (one of CONVERT_DTYPES: for an fp8
    format, the linear/conv weights of the architecture the file declares in it and the rest fp32).

    An existing `dst` is refused unless `overwrite`. The output appears only once complete (temp file +
    rename), so a failed run never leaves a partial file that a model list would offer."""
    src, dst = Path(src), Path(dst)
    if dtype not in CONVERT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(CONVERT_DTYPES)}, not {dtype!r}")
    if dst.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{dst}: the output must be a .safetensors file")
    if dst.resolve() == src.resolve() or (dst.exists() and src.exists() and dst.samefile(src)):
        raise CheckpointError(f"{dst}: is the source file itself; choose another output name")
    if (problem := output_problem(dst, overwrite)) is not None:
        raise CheckpointError(problem)
    sd, metadata = read_state_dict(src)
    if expected is not None:
        check_state_dict(sd, expected, str(src))
    out = _converted(src, sd, metadata, dtype)
    try:
        with atomic_path(dst, overwrite) as tmp:
            save_file(out, tmp, metadata={**metadata, "format": "pt", "dtype": dtype, "source": src.name})
    except OutputError as e:
        raise CheckpointError(str(e)) from e
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{dst}: could not be written ({e}); check the folder's free space and "
                              "permissions") from e


def _converted(src: Path, sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
               dtype: str) -> dict[str, torch.Tensor]:
    """`sd` with floating tensors in `dtype`; refused where a value falls outside its range."""
    stored = STORAGE_FORMATS.get(dtype)
    large = large_weights(EmoCASTNet(checkpoint_config(src, metadata), device="meta")) if stored else set()
    out = {}
    for key, t in sd.items():
        target = stored if key in large else DTYPES.get(dtype, torch.float32)
        if t.is_floating_point():
            check_range(t, target, f"{src}: {key}")
        out[key] = t.to(target).contiguous() if t.is_floating_point() else t.contiguous()
    return out


def check_range(t: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Raise CheckpointError when a finite value of `t` lies beyond `dtype`'s range (casting would turn it into
    infinity, or clip it to the largest fp8_e4m3fn value, without a word), naming the formats that hold it."""
    limit = torch.finfo(dtype).max
    if t.is_meta:  # shapes only (the bench's memory counts): no values to check
        return
    if torch.finfo(t.dtype).max <= limit or not bool((t.abs() > limit).logical_and(t.isfinite()).any()):
        return
    formats = {**DTYPES, **STORAGE_FORMATS}
    name = next((n for n, d in formats.items() if d == dtype), str(dtype))
    wider = [n for n, d in formats.items() if torch.finfo(d).max > limit]
    raise CheckpointError(f"{what} has values beyond the {name} range (+-{limit:g}); choose {' or '.join(wider)} "
                          "instead")


def net_shapes(config: NetConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the network of `config`, from the model code on the meta device (no memory used)."""
    return {k: tuple(v.shape) for k, v in EmoCASTNet(config, device="meta").state_dict().items()}


def load_net(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
             config: NetConfig | None = None, operations: type | None = None,
             weight_dtype: str = "default") -> EmoCASTNet:
    """The network with the weights of `path`, strictly checked, floating tensors in `dtype` on `device`.

    The architecture is `config`, else the one the file declares (CONFIG_KEY), else the released one.
    `weight_dtype` (WEIGHT_DTYPES): "default", or a storage format for the linear/conv weights, which are then
    cast to `dtype` in every call. `operations` is the layer namespace (models/ops.py; default plain torch, or
    its casting layers for a storage format), e.g. ComfyUI's casting ops."""
    stored = _storage_format(weight_dtype)
    if stored and operations is TorchOps:
        raise ValueError("weights stored in fp8 need casting layers (models.ops.CastOps, or ComfyUI's)")
    sd, metadata = read_state_dict(path)
    config = config or checkpoint_config(path, metadata)
    check_state_dict(sd, net_shapes(config), str(path))
    net = EmoCASTNet(config, device="meta", operations=operations or (CastOps if stored else TorchOps))
    if metadata.get(NOTE_KEY):
        logging.getLogger("emocast").warning("%s: %s", path, metadata[NOTE_KEY])
    return assign_weights(net, sd, dtype, device, weight_dtype, str(path))


def _storage_format(weight_dtype: str) -> torch.dtype | None:
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, not {weight_dtype!r}")
    return STORAGE_FORMATS.get(weight_dtype)


def assign_weights(net: nn.Module, sd: Mapping[str, torch.Tensor], dtype: torch.dtype,
                   device: torch.device | str, weight_dtype: str = "default", source: str = "weights") -> nn.Module:
    """`net` (a network or a part of one, built on the meta device) holding `sd`: floating tensors in `dtype` on
    `device`, the linear/conv weights in the storage format `weight_dtype` instead when it is not "default"
    (checked against its range). The tensors are converted one at a time, so `sd` may be a lazy mapping."""
    stored = _storage_format(weight_dtype)
    large = large_weights(net) if stored else set()
    out = {}
    for key, t in sd.items():
        if key in large:
            check_range(t, stored, f"{source}: {key} (weight_dtype {weight_dtype})")
        target = stored if key in large else dtype if t.is_floating_point() else t.dtype
        out[key] = t.to(device, target)
    net.load_state_dict(out, assign=True)
    return net.eval()
