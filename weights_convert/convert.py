"""Converting reference checkpoints into Keras models and `.weights.h5` files."""

import os

from weights_convert.checkpoint import read_checkpoint
from weights_convert.errors import ConversionError
from weights_convert.mapping import HEAD_KEYS
from weights_convert.mapping import PYRAMID_NORM_KEYS
from weights_convert.mapping import STEM_KEY
from weights_convert.mapping import assign_state_dict

KERAS_WEIGHTS_SUFFIX = ".weights.h5"


def detect_variant(state_dict, source="checkpoint"):
    """Names the variant of `keras_twins.VARIANTS` whose shapes the state dict has.

    Heads are not part of the signature: the number of heads cannot be read
    from shapes, so the architecture must be one of the table's.
    """
    from keras_twins.variants import VARIANTS

    found = _signature(state_dict)
    if not found[0]:
        raise ConversionError(f"{source}: not a Twins checkpoint: none of its "
                              f"{len(state_dict)} keys is a patch_embeds.* or blocks.* key")
    for name, entry in VARIANTS.items():
        config = entry["config"]
        if found == (
            tuple(config["embed_dims"]),
            tuple(config["depths"]),
            tuple(int(d * r) for d, r in zip(config["embed_dims"], config["mlp_ratios"])),
            config["window_sizes"] is not None,
        ):
            return name
    embed_dims, depths, _, _ = found
    raise ConversionError(
        f"{source}: no Twins variant has these shapes (embed dims {list(embed_dims)}, "
        f"depths {list(depths)}); pass --variant NAME to name one of "
        f"{', '.join(VARIANTS)}"
    )


def _signature(state_dict):
    """(embed dims, depths, MLP widths, has windows), each read from any key that shows it.

    Any one key may be missing from a damaged checkpoint: the variant is
    still found, and loading then names the missing key.
    """
    embed_dims, depths, hidden_dims = {}, {}, {}
    has_windows = False
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "patch_embeds" and parts[1].isdigit():
            embed_dims[int(parts[1])] = value.shape[0]  # proj and norm: (dim, ...)
        elif len(parts) > 4 and parts[0] == "blocks" and parts[1].isdigit() \
                and parts[2].isdigit():
            stage, block = int(parts[1]), int(parts[2])
            depths[stage] = max(depths.get(stage, 0), block + 1)
            if parts[3:5] == ["mlp", "fc1"]:
                hidden_dims[stage] = value.shape[0]
            has_windows = has_windows or parts[3:5] == ["attn", "qkv"]  # LSA's
    stages = range(max([*embed_dims, *depths], default=-1) + 1)
    return (tuple(embed_dims.get(s) for s in stages), tuple(depths.get(s, 0) for s in stages),
            tuple(hidden_dims.get(s) for s in stages), has_windows)


def build_model_for(state_dict, variant=None, source="checkpoint"):
    """A Keras model with the variant and head of the checkpoint, weights loaded."""
    from keras_twins import Twins
    from keras_twins.variants import get_variant

    if variant is None:
        variant = detect_variant(state_dict, source)
    try:
        config = get_variant(variant)["config"]
    except ValueError as error:
        raise ConversionError(str(error)) from None
    # Either half of a head makes it a classifier, so that a checkpoint
    # missing the other half is refused rather than converted without one.
    head = [state_dict[key] for key in HEAD_KEYS if key in state_dict]
    include_top = bool(head)
    classes = head[0].shape[0] if include_top else 1000
    pyramid_norm = any(key.startswith(PYRAMID_NORM_KEYS) for key in state_dict)
    # A model trained on other than RGB images (timm's in_chans) keeps its channels.
    stem = state_dict.get(STEM_KEY)
    channels = int(stem.shape[1]) if stem is not None and len(stem.shape) == 4 else 3
    model = Twins(**config, include_top=include_top, classes=classes,
                  input_shape=(None, None, channels), pyramid_norm=pyramid_norm, name=variant)
    assign_state_dict(model, state_dict, source, include_top=include_top)
    return model


def convert(source, output, variant=None):
    """Converts the checkpoint at `source` into the Keras weights file `output`.

    The file is written under a temporary name and renamed at the end, so a
    failure never leaves a partial or stale file at `output`.

    Returns:
        The Keras model the weights belong to.
    """
    output = os.fspath(output)
    if not output.endswith(KERAS_WEIGHTS_SUFFIX):
        raise ConversionError(
            f"the output must end in {KERAS_WEIGHTS_SUFFIX}. Received: {output}"
        )
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
        raise ConversionError(f"{output}: the output directory does not exist")
    if not os.access(directory, os.W_OK):
        raise ConversionError(f"{output}: the output directory is not writable")
    state_dict = read_checkpoint(source)
    model = build_model_for(state_dict, variant, source=os.fspath(source))
    from keras_twins.files import replacing

    try:
        with replacing(output) as temporary:
            model.save_weights(temporary, overwrite=True)
    except OSError as error:
        raise ConversionError(f"{output}: could not write ({error})") from None
    return model


def load_checkpoint_into_model(model, path, include_top=True, classes=None):
    """Converts a reference checkpoint on the fly into an already-built model.

    Raises:
        ValueError: the checkpoint does not fit the model, naming what differs.
    """
    state_dict = read_checkpoint(path)
    head = state_dict.get("head.weight")
    if include_top and head is not None and classes is not None and head.shape[0] != classes:
        raise ValueError(
            f"The checkpoint {os.fspath(path)} has a head of {head.shape[0]} "
            f"classes; pass `classes={head.shape[0]}`, or `include_top=False` "
            f"to drop the head. Received: classes={classes}"
        )
    assign_state_dict(model, state_dict, os.fspath(path), include_top=include_top)
