"""Reads PyTorch checkpoints into `{key: float32 numpy array}`.

`.safetensors` is parsed here, with no torch and no code execution.
Pickled formats (`.pth`, `.pt`, `.bin`, `.ckpt`, `.pth.tar`) go through
`torch.load(weights_only=True)`, which refuses any pickle that would run code;
torch is imported only for them.
"""

import argparse
import json
import os

import numpy as np

from weights_convert.errors import ConversionError

# ".pth.tar" and ".tar": the names timm's train.py gives its checkpoints.
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
# Where training scripts keep the weights in a checkpoint: timm's train.py
# ("state_dict", "state_dict_ema"), the official repository's DeiT-style
# main.py ("model", "model_ema"). The EMA copy is used when it is the only one.
_WRAPPERS = ("model", "state_dict", "state_dict_ema", "model_ema")
SAFETENSORS_SUFFIX = ".safetensors"
# The keys that make a state dict a Twins': its stage modules.
TWINS_KEYS = ("patch_embeds.", "blocks.")

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # widened to float32 below; numpy has no bfloat16.
}


def read_checkpoint(path):
    """Returns the state dict of the checkpoint at `path` as float32 arrays.

    Training checkpoints are unwrapped: `{"model": ...}` or `{"state_dict":
    ...}`, else the EMA weights (`"state_dict_ema"`, `"model_ema"`), beside
    an optimizer state and the training script's `argparse.Namespace`. A
    DistributedDataParallel `module.` prefix is removed. Of a detection or
    segmentation checkpoint, the backbone's weights are kept: an SVT's
    per-stage norms (`norm_list.*`) are the pyramid norms of
    `keras_twins.Twins(pyramid_norm=True)`.

    Raises:
        ConversionError: the file is missing, truncated, not a checkpoint, or
            a pickle that carries code.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ConversionError(f"{path}: a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such checkpoint file")
    if not path.endswith((SAFETENSORS_SUFFIX,) + PICKLE_SUFFIXES):
        raise ConversionError(
            f"{path}: unknown checkpoint format; expected one of "
            f"{', '.join((SAFETENSORS_SUFFIX,) + PICKLE_SUFFIXES)}"
        )
    try:
        if path.endswith(SAFETENSORS_SUFFIX) or not _saved_by_torch(path):
            state_dict = read_safetensors(path)
        else:
            state_dict = _read_pickle(path)
    except OSError as error:  # unreadable: permissions, a failing disk
        raise ConversionError(f"{path}: cannot be read ({error.strerror or error})") from None
    if not state_dict:
        raise ConversionError(f"{path}: the checkpoint holds no tensors")
    if all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
    return _backbone_of(state_dict)


def _backbone_of(state_dict):
    """The backbone of a detection or segmentation checkpoint (the official
    repository's, mmdetection's, mmsegmentation's: `backbone.blocks.0.0...`),
    without the prefix and without the classification head that those
    backbones keep unused; any other state dict as it is."""
    prefix = "backbone."
    if any(key.startswith(TWINS_KEYS) for key in state_dict) or not any(
            key.startswith(prefix) and key[len(prefix):].startswith(TWINS_KEYS)
            for key in state_dict):
        return state_dict
    return {key[len(prefix):]: value for key, value in state_dict.items()
            if key.startswith(prefix) and not key.startswith(prefix + "head.")}


def read_safetensors_header(path):
    """Parses and checks the header of a safetensors file.

    Returns:
        `(header, data_start, file_size)`: `header` maps tensor names to
        `{"dtype", "shape", "data_offsets"}`; offsets are relative to
        `data_start`.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ConversionError(f"{path}: not a safetensors file (only {size} bytes)")
        header_size = int.from_bytes(prefix, "little")
        if header_size > size - 8:
            raise ConversionError(
                f"{path}: not a safetensors file, or truncated: the header "
                f"claims {header_size} bytes but the file has {size}"
            )
        try:
            header = json.loads(f.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConversionError(
                f"{path}: not a safetensors file (unreadable header: {error})"
            ) from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: not a safetensors file (header is not a mapping)")
    header.pop("__metadata__", None)
    data_start = 8 + header_size
    for name, info in header.items():
        try:
            dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except KeyError:
            raise ConversionError(
                f"{path}: tensor {name!r} has an unsupported or missing dtype "
                f"({info.get('dtype') if isinstance(info, dict) else info!r}); "
                "expected floating point weights"
            ) from None
        except (TypeError, ValueError):
            raise ConversionError(f"{path}: malformed header entry for {name!r}") from None
        if end - begin != int(np.prod(shape)) * dtype.itemsize or begin > end:
            raise ConversionError(
                f"{path}: tensor {name!r} of shape {list(shape)} does not fit "
                f"its byte range {begin}..{end}"
            )
        if data_start + end > size:
            raise ConversionError(
                f"{path}: truncated: tensor {name!r} ends at byte "
                f"{data_start + end} but the file has {size}"
            )
    return header, data_start, size


def read_safetensors(path):
    header, data_start, _ = read_safetensors_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    state_dict = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        raw = data[data_start + begin:data_start + end]
        array = raw.view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        state_dict[name] = np.array(array, dtype=np.float32)
    return state_dict


def _saved_by_torch(path):
    """Whether the file begins as `torch.save` writes: a zip archive (since
    torch 1.6), a pickle (before, and `pickle.dump`) or a tar archive (before
    torch 0.4). Else torch reads it as a pickle anyway, and a text file, a web
    page saved in the checkpoint's place or an empty file fails with
    `KeyError: '105'`, `EOFError` or a misleading "Weights only load failed"."""
    with open(path, "rb") as f:
        head = f.read(262)
    if not head:
        raise ConversionError(f"{path}: an empty file, not a checkpoint")
    if head.startswith((b"PK\x03\x04", b"\x80")) or head[257:262] == b"ustar":
        return True
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1:
        return False  # a safetensors file under another suffix
    raise ConversionError(
        f"{path}: not a PyTorch checkpoint: it begins with {head[:24]!r}, neither a zip "
        "archive nor a pickle (a text file or a web page saved in its place?)")


def _read_pickle(path):
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{path}: reading pickled PyTorch checkpoints needs torch "
            "(pip install torch); .safetensors files need no torch"
        ) from None
    try:
        # timm's and the official repository's training scripts store their
        # argparse.Namespace beside the weights: plain data, safe to allow.
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for bad files.
        message = str(error)
        if "Weights only load failed" in message:
            raise ConversionError(
                f"{path}: refused: the pickle holds code or objects other than "
                "tensors, and was not run (torch.load weights_only=True); for a whole "
                "model saved with torch.save(model), save model.state_dict() instead"
            ) from None
        first_line = message.strip().splitlines()[0] if message.strip() else type(error).__name__
        raise ConversionError(
            f"{path}: not a readable PyTorch checkpoint (truncated or another "
            f"format): {first_line}"
        ) from None
    for wrapper in _WRAPPERS:
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
            break
    if not isinstance(checkpoint, dict):
        raise ConversionError(
            f"{path}: expected a state dict (a mapping of names to tensors), "
            f"found {type(checkpoint).__name__}"
        )
    state_dict = {}
    for name, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(
                f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor"
            )
        state_dict[name] = value.detach().to(torch.float32).cpu().numpy()
    return state_dict
