"""Keras weight paths <-> reference state-dict keys, and tensor layouts.

The only place that speaks PyTorch names: timm and the official Twins
repository share the same keys (`patch_embeds.0.proj.weight`,
`blocks.2.3.attn.kv.bias`, `pos_block.1.proj.0.weight`, ...).
"""

import re

import numpy as np

from weights_convert.errors import ConversionError

HEAD_KEYS = ("head.weight", "head.bias")
# The first convolution, (out, in channels, kh, kw).
STEM_KEY = "patch_embeds.0.proj.weight"

_INDEXED_SEGMENTS = (
    (re.compile(r"^patch_embed_(\d+)$"), r"patch_embeds.\1"),
    (re.compile(r"^stage_(\d+)_block_(\d+)$"), r"blocks.\1.\2"),
    # the reference wraps its PEG convolution in nn.Sequential: `proj.0`
    (re.compile(r"^pos_encoding_(\d+)$"), r"pos_block.\1.proj.0"),
    # the official SVT detection / segmentation backbones' per-stage norms
    (re.compile(r"^pyramid_norm_(\d+)$"), r"norm_list.\1"),
)
PYRAMID_NORM_KEYS = "norm_list."
_RENAMED_SEGMENTS = {
    "attention": "attn",
    "projection": "proj",
    "query": "q",
    "key_value": "kv",
    "subsample": "sr",
    "subsample_norm": "norm",
    "kernel": "weight",
    "depthwise_kernel": "weight",
    "gamma": "weight",
    "beta": "bias",
}


def reference_key(keras_path):
    """`stage_2_block_3/attention/key_value/kernel` -> `blocks.2.3.attn.kv.weight`."""
    segments = []
    for segment in keras_path.split("/"):
        for pattern, replacement in _INDEXED_SEGMENTS:
            if pattern.match(segment):
                segment = pattern.sub(replacement, segment)
                break
        else:
            segment = _RENAMED_SEGMENTS.get(segment, segment)
        segments.append(segment)
    return ".".join(segments)


def _permutation(keras_path, rank):
    """Axis permutation that takes the PyTorch layout to the Keras layout."""
    if rank == 4:
        # depthwise [C, 1, kh, kw] -> [kh, kw, C, 1]; conv [O, I, kh, kw] -> [kh, kw, I, O]
        return (2, 3, 0, 1) if keras_path.endswith("depthwise_kernel") else (2, 3, 1, 0)
    if rank == 2:
        return (1, 0)  # Linear [out, in] -> Dense [in, out]
    return tuple(range(rank))


def check_finite(array, source, name, kind="checkpoint"):
    """Refuses an `array` (`name` in `source`) holding NaN or infinity."""
    bad = np.size(array) - np.count_nonzero(np.isfinite(array))
    if bad:
        raise ConversionError(
            f"{source}: {name!r} holds {bad} non-finite value{'s' if bad > 1 else ''} "
            f"(NaN or infinity): a damaged {kind}, or one saved after training diverged")


def assign_state_dict(model, state_dict, source, include_top=True):
    """Assigns reference weights to `model`, strictly.

    Every Keras weight must be found, and every checkpoint tensor used
    (the head's tensors are skipped when `include_top` is False). The one
    exception: pyramid norms (`pyramid_norm=True`) that the checkpoint has
    none of keep their identity start, as for ImageNet weights. Nothing is
    assigned unless everything fits.

    Raises:
        ConversionError: naming the key and the shapes that differ.
    """
    expected = {reference_key(v.path): v for v in model.weights}
    available = set(state_dict)
    if not include_top:
        available -= set(HEAD_KEYS)
    if not any(key.startswith(PYRAMID_NORM_KEYS) for key in available):
        expected = {key: v for key, v in expected.items()
                    if not key.startswith(PYRAMID_NORM_KEYS)}
    missing = sorted(set(expected) - available)
    if missing:
        raise ConversionError(
            f"{source}: missing key {missing[0]!r} for {model.name}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; is it a checkpoint of another variant?"
        )
    unexpected = sorted(available - set(expected))
    if any(key.startswith(PYRAMID_NORM_KEYS) for key in unexpected):
        raise ConversionError(
            f"{source}: holds the per-stage norms of a detection or segmentation backbone "
            f"({PYRAMID_NORM_KEYS}*), which {model.name} lacks; build it with "
            "pyramid_norm=True"
        )
    if unexpected:
        raise ConversionError(
            f"{source}: unexpected key {unexpected[0]!r} for {model.name}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + "; is it a checkpoint of another variant?"
        )
    arrays = []
    for key, variable in expected.items():
        tensor = state_dict[key]
        permutation = _permutation(variable.path, len(variable.shape))
        expected_shape = [variable.shape[i] for i in np.argsort(permutation)]
        if key == STEM_KEY and differs_in_channels(tensor.shape, expected_shape, axis=1):
            check_stem_channels(tensor.shape[1], expected_shape[1], source, model.name)
            check_finite(tensor, source, key)
            from keras_twins.channels import adapt_stem_kernel  # keras_twins imports this module

            kernel = adapt_stem_kernel(np.transpose(tensor, permutation), expected_shape[1])
            arrays.append((variable, kernel))
            continue
        if list(tensor.shape) != expected_shape:
            raise ConversionError(
                f"{source}: shape mismatch for {key!r}: checkpoint has "
                f"{list(tensor.shape)}, {model.name} expects {expected_shape}"
            )
        check_finite(tensor, source, key)
        arrays.append((variable, np.transpose(tensor, permutation)))
    for variable, array in arrays:
        variable.assign(array)


def differs_in_channels(shape, expected_shape, axis):
    """Whether a convolution kernel's `shape` differs from the expected one in
    its input channels alone: `axis` 1 of PyTorch's (out, in, kh, kw), 2 of
    Keras' (kh, kw, in, out)."""
    shape, expected_shape = list(shape), list(expected_shape)
    if not len(shape) == len(expected_shape) == 4 or shape[axis] == expected_shape[axis]:
        return False
    del shape[axis], expected_shape[axis]
    return shape == expected_shape


def check_stem_channels(found, channels, source, model_name):
    """Refuses weights whose first convolution takes `found` channels for a
    model of `channels`, unless they are RGB's, which are adapted
    (`keras_twins.channels.adapt_stem_kernel`)."""
    if found != 3:
        raise ConversionError(
            f"{source}: its first convolution takes {found}-channel images and {model_name} "
            f"takes {channels}; only RGB (3-channel) weights are adapted to another count: "
            f"build the model with input_shape=(H, W, {found})")
