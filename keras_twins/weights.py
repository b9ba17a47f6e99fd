"""Loads the `weights` argument of the constructors into a built model."""

import collections
import io
import os
import re
import tempfile
import warnings
import zipfile

import numpy as np

from keras_twins.channels import RGB
from keras_twins.channels import adapt_stem_kernel
from weights_convert.mapping import check_finite
from weights_convert.mapping import differs_in_channels

# The Twins layer whose kernel takes the image channels.
STEM_LAYER = "patch_embed_0"
# What `weights=` takes, besides "imagenet": Keras' files and PyTorch checkpoints.
WEIGHTS_SUFFIXES = (".h5", ".keras", ".safetensors", ".pth", ".pt", ".bin")

# What a Keras weights file holds (`_weights_file_contents`). names: its
# top-level layers. where: "" for a Twins that is the file's model, the
# file's name of a top-level layer for a Twins inside a larger model (the
# snake-case name of its class), None for no Twins. architecture: as
# `architecture_in_weights_file`, None where it cannot be told.
# pyramid_norms: whether the Twins has them (`pyramid_norm=True`).
# stem_channels: the input channels of its first convolution, None where unknown.
_Contents = collections.namedtuple("_Contents",
                                   "names where architecture pyramid_norms stem_channels")


def load_weights(model, weights, variant, include_top, classes):
    """Loads `"imagenet"`, a Keras weights file or a PyTorch checkpoint into `model`.

    Args:
        model: the built model.
        weights: `"imagenet"` or a path: a Keras `.weights.h5` / `.keras`
            file, or a timm / official Twins checkpoint (`.safetensors`,
            `.pth`, `.pt`, `.bin`), converted on the fly by `weights_convert`.
        variant: the variant name of the model's architecture (for
            `"imagenet"`).
        include_top: whether the model has the classification head.
        classes: the head's size.

    Raises:
        ValueError: the file does not fit the model, with what differs.
        keras_twins.pretrained.WeightsDownloadError: ImageNet weights could
            not be fetched.
    """
    if weights == "imagenet":
        from keras_twins import pretrained

        path = pretrained.imagenet_weights(variant)
        try:
            _load_keras_weights(model, path, classes)
        except ValueError as error:
            # A damaged cache entry (a disk error, a copy cut short) failed
            # every later call, the same way, until deleted by hand.
            warnings.warn(f"{error}. Fetching the ImageNet weights of {variant} again.",
                          stacklevel=3)
            pretrained.discard_cached_weights(variant)
            _load_keras_weights(model, pretrained.imagenet_weights(variant), classes)
        return
    path = os.fspath(weights)
    if not path.endswith((".h5", ".keras")):
        from weights_convert import load_checkpoint_into_model

        load_checkpoint_into_model(model, path, include_top=include_top, classes=classes)
        return
    _load_keras_weights(model, path, classes)


def _load_keras_weights(model, path, classes):
    """`model.load_weights(path)`; a file that does not fit is one ValueError line.

    A file of a larger model that holds a Twins as one of its layers (a Twins
    under a new head, as fine-tuning builds it) gives that Twins' weights.
    """
    try:
        _load_with_its_warnings(model, path)
    except Exception as error:  # Keras raises several types; say which file.
        failure = error
    else:
        return _check_finite(model, path)
    contents = _weights_file_contents(path)
    if contents and contents.where and contents.architecture in (None, _architecture_of(model)):
        with tempfile.TemporaryDirectory() as folder:
            try:
                _load_with_its_warnings(model, _extract_layer(path, contents.where, folder))
            except Exception as error:
                failure = error
            else:
                return _check_finite(model, path)
    raise ValueError(_head_mismatch(failure, path, classes) or
                     _other_architecture(path, model, contents) or
                     f"Could not load the weights file {path} into {model.name}: "
                     f"{_first_part(failure)}") from None


def _check_finite(model, path):
    """Refuses NaN or infinite weights (a `ValueError`), as the converter
    refuses them in a checkpoint: a run that diverged saves them, and its
    model predicted NaN."""
    for variable in model.weights:
        if "float" not in variable.dtype:
            continue  # a seed generator's state
        check_finite(_on_the_host(variable.value), path, variable.path, kind="file")


def _on_the_host(value):
    """A backend's array as NumPy's, without NumPy 2's copy-keyword warning
    that `np.asarray` of a TensorFlow variable or a torch tensor gives."""
    if hasattr(value, "detach"):  # torch
        value = value.detach().cpu()
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def _load_with_its_warnings(model, path):
    """`model.load_weights(path)`, and Keras' warnings only if it loads: a
    file that does not fit gets the one-line error alone, without Keras'
    warnings about the parts it could not match."""
    with warnings.catch_warnings(record=True) as caught:
        model.load_weights(path)
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename,
                               warning.lineno, module=None)


def _extract_layer(path, layer, folder):
    """Writes the weights of one top-level layer of a Keras weights file into
    `folder` as a weights file of their own, which that layer's
    `load_weights` reads; returns its path."""
    import h5py

    destination = os.path.join(folder, f"{layer}.weights.h5")
    with h5py.File(_weights_of_keras_file(path) or path, "r") as f, \
            h5py.File(destination, "w") as part:
        for name, item in f["layers"][layer].items():
            f.copy(item, part, name=name)
    return destination


def _head_mismatch(error, path, classes):
    """Keras' error for a file whose head differs from the model's, said as a
    checkpoint's is (`weights_convert.load_checkpoint_into_model`); None for
    any other error. Keras named only the shapes of a variable."""
    text = " ".join(str(error).split())
    if "A total of 1 objects could not be loaded" not in text or "name=head," not in text:
        return None
    other = re.search(r"value\.shape=\(\d+, (\d+)\)", text)
    if other:
        return (f"The weights file {path} has a head of {other.group(1)} classes; pass "
                f"`classes={other.group(1)}`, or `include_top=False` to drop the head. "
                f"Received: classes={classes}")
    if "received 0 variables" in text:
        return (f"The weights file {path} has no classification head (its model was built "
                "with include_top=False); pass `include_top=False`")
    return None


def _other_architecture(path, model, contents):
    """What a Keras weights file that did not load holds (`contents`, from
    `_weights_file_contents`), when it is not the model's architecture:
    another Twins, a larger model with a Twins inside, or no Twins at all;
    None otherwise. Keras' error named one layer that did not fit, not what
    the file is."""
    if contents is None:
        return None
    if contents.where is None:
        if not contents.names:
            return f"The weights file {path} holds no Keras model's weights"
        return (f"The weights file {path} holds no Twins model's weights: none of its "
                f"{len(contents.names)} layers is a Twins or holds one")
    if contents.architecture not in (None, _architecture_of(model)):
        inside = " (inside a larger model)" if contents.where else ""
        return (f"The weights file {path} holds the weights of "
                f"{_describe(contents.architecture)}{inside}, not of {model.name}")
    if contents.pyramid_norms and not _has_pyramid_norms(model):
        return (f"The weights file {path} holds pyramid norms (its model was built with "
                "pyramid_norm=True); pass `pyramid_norm=True`")
    return None


def _describe(architecture):
    """A variant's name, or the stages of another Twins; "a Twins" when unknown."""
    if architecture is None:
        return "a Twins"
    from keras_twins import variants

    embed_dims, depths, lsa = architecture
    name = variants.find_variant(embed_dims=embed_dims, depths=depths,
                                 window_sizes=(7,) * len(embed_dims) if lsa else None)
    family = "Twins-SVT" if lsa else "Twins-PCPVT"
    return name or f"a {family} with embed_dims={embed_dims} and depths={depths}"


def architecture_of_config(config):
    """(embed_dims, depths, has LSA blocks) of `keras_twins.Twins` arguments,
    as `architecture_in_weights_file` reads them from a file."""
    return (tuple(config["embed_dims"]), tuple(config["depths"]),
            config.get("window_sizes") is not None)


def _architecture_of(model):
    """(embed_dims, depths, has LSA blocks) of a built Twins model, as
    `architecture_in_weights_file` reads them from a file."""
    from keras_twins.layers import LocallyGroupedSelfAttention
    from keras_twins.layers import PatchEmbedding
    from keras_twins.layers import TransformerBlock

    layers = list(model._flatten_layers())
    embed_dims = tuple(layer.dim for layer in layers if isinstance(layer, PatchEmbedding))
    blocks = [layer for layer in layers if isinstance(layer, TransformerBlock)]
    widths = [block.dim for block in blocks]
    lsa = any(isinstance(block.attention, LocallyGroupedSelfAttention) for block in blocks)
    return embed_dims, tuple(widths.count(dim) for dim in embed_dims), lsa


def architecture_in_weights_file(path):
    """(embed_dims, depths, has LSA blocks) of the Twins whose weights a Keras
    `.weights.h5` or `.keras` file holds, read from its layers' shapes; None
    for any other file, a Twins inside a larger model, or stages of equal
    widths (whose blocks cannot be told apart)."""
    contents = _weights_file_contents(path)
    return contents.architecture if contents and contents.where == "" else None


def loading_layout(weights):
    """`(pyramid_norms, stem_channels)` of `weights`, before loading them.

    pyramid_norms: whether they load straight into a model built with
    `pyramid_norm=True`: a Keras file of such a model, or a PyTorch
    checkpoint (a detection or segmentation backbone's holds the norms, and
    in another's they are left at their identity start). ImageNet weights
    and other Keras files load into the model without them.

    stem_channels: the image channels that the first convolution of
    `"imagenet"` or a Keras file takes; None for a PyTorch checkpoint (whose
    stem `weights_convert` adapts as it assigns it) and where it cannot be
    read.
    """
    if weights == "imagenet":
        return False, RGB
    path = os.fspath(weights)
    if not path.endswith((".h5", ".keras")):
        return True, None
    contents = _weights_file_contents(path)
    if contents is None:
        return False, None
    return contents.pyramid_norms, contents.stem_channels


def copy_weights(source, target):
    """Copies each layer of `source` that has weights into `target`'s layer of
    the same name (`transferable`)."""
    for layer in source.layers:
        if layer.weights:
            destination = target.get_layer(layer.name)
            destination.set_weights(transferable(layer, destination))


def transferable(source, target):
    """The weights of the layer `source` for the layer `target` of another
    model: as they are, or with the first convolution's RGB kernel adapted to
    `target`'s channels (`keras_twins.channels.adapt_stem_kernel`); None
    where they do not fit."""
    values, shapes = source.get_weights(), [tuple(v.shape) for v in target.weights]
    if len(values) != len(shapes):
        return None
    fitted = []
    for value, shape in zip(values, shapes):
        if value.shape != shape:
            if not (target.name == STEM_LAYER and differs_in_channels(value.shape, shape, axis=2)
                    and value.shape[2] == RGB):
                return None
            value = adapt_stem_kernel(value, shape[2])
        fitted.append(value)
    return fitted


def _stem_channels_of_layers(layers):
    try:
        first = _numbered(layers, "patch_embedding")[0]
        return int(layers[first]["projection"]["vars"]["0"].shape[2])
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def _has_pyramid_norms(model):
    return any(layer.name.startswith("pyramid_norm_") for layer in model._flatten_layers())


def _weights_file_contents(path):
    """What a Keras weights file holds, as `_Contents`; None for a file that
    is not one."""
    import h5py

    def twins(names, where, layers):
        # The final norm is one LayerNorm; pyramid norms add one per stage.
        return _Contents(names, where, _architecture_of_layers(layers),
                         len(_numbered(layers, "layer_norm")) > 1, _stem_channels_of_layers(layers))

    try:
        with h5py.File(_weights_of_keras_file(path) or path, "r") as f:
            if "layer_names" in f.attrs or "model_weights" in f:
                return None  # Keras 2's layout, which load_weights matches by layer order
            if not isinstance(f.get("layers"), h5py.Group):  # another library's file
                return _Contents([], None, None, False, None)
            layers = f["layers"]
            names = list(layers)
            if _is_twins(layers):
                return twins(names, "", layers)
            for name in names:
                inner = layers[name].get("layers") if isinstance(layers[name], h5py.Group) else None
                if isinstance(inner, h5py.Group) and _is_twins(inner):
                    return twins(names, name, inner)
            return _Contents(names, None, None, False, None)
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile):
        return None


def _numbered(layers, prefix):
    """Keras' names of a layer class's instances, in order: prefix, prefix_1, ..."""
    names = [n for n in layers if re.fullmatch(rf"{prefix}(_\d+)?", n)]
    return sorted(names, key=lambda n: int(n[len(prefix) + 1:] or 0))


def _is_twins(layers):
    return bool(_numbered(layers, "patch_embedding")) and bool(
        _numbered(layers, "transformer_block"))


def _architecture_of_layers(layers):
    try:
        embed_dims = tuple(int(layers[n]["projection"]["vars"]["0"].shape[-1])
                           for n in _numbered(layers, "patch_embedding"))
        blocks = [layers[n] for n in _numbered(layers, "transformer_block")]
        widths = [int(block["norm1"]["vars"]["0"].shape[0]) for block in blocks]
        lsa = any("qkv" in block["attention"] for block in blocks)
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    depths = tuple(widths.count(dim) for dim in embed_dims)
    if len(set(embed_dims)) < len(embed_dims) or sum(depths) != len(widths):
        return None
    return embed_dims, depths, lsa


def _weights_of_keras_file(path):
    """The `model.weights.h5` inside a `.keras` file (a zip archive), in
    memory; None for any other file."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        return io.BytesIO(archive.read("model.weights.h5"))


def _first_part(error, limit=300):
    """Keras' load error on one line, without its list of every layer that did not fit."""
    detail = " ".join(str(error).split()) or type(error).__name__
    detail = detail.split(" List of objects that could not be loaded:")[0]
    return detail if len(detail) <= limit else detail[:limit].rsplit(" ", 1)[0] + " ..."
