"""Loads the `weights` argument of the constructors into a built model."""

import os
import re
import warnings

# What `weights=` takes, besides "imagenet": Keras' files and PyTorch checkpoints.
WEIGHTS_SUFFIXES = (".h5", ".keras", ".safetensors", ".pth", ".pt", ".bin")


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
    """`model.load_weights(path)`; a file that does not fit is one ValueError line."""
    # Keras warns about the parts it could not match before it raises: a file
    # that does not fit gets the one-line error alone.
    with warnings.catch_warnings(record=True) as caught:
        try:
            model.load_weights(path)
        except Exception as error:  # Keras raises several types; say which file.
            raise ValueError(_head_mismatch(error, path, classes) or
                             f"Could not load the weights file {path} into {model.name}: "
                             f"{_first_part(error)}") from None
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename,
                               warning.lineno, module=None)


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


def _first_part(error, limit=300):
    """Keras' load error on one line, without its list of every layer that did not fit."""
    detail = " ".join(str(error).split()) or type(error).__name__
    detail = detail.split(" List of objects that could not be loaded:")[0]
    return detail if len(detail) <= limit else detail[:limit].rsplit(" ", 1)[0] + " ..."
