"""Loads the `weights` argument of the constructors into a built model."""

import os


def load_weights(model, weights, include_top, classes):
    """Loads a Keras `.weights.h5` file or a PyTorch checkpoint into `model`.

    PyTorch checkpoints (timm or official Twins; `.safetensors`, `.pth`,
    `.pt`, `.bin`) are converted on the fly by `weights_convert`.

    Raises:
        ValueError: the file does not fit the model, with what differs.
    """
    path = os.fspath(weights)
    if path.endswith(".h5") or path.endswith(".keras"):
        try:
            model.load_weights(path)
        except Exception as error:  # Keras raises several types; say which file.
            detail = " ".join(str(error).split()) or type(error).__name__
            raise ValueError(
                f"Could not load the weights file {path} into {model.name}: "
                f"{detail}"
            ) from None
        return
    from weights_convert import load_checkpoint_into_model

    load_checkpoint_into_model(model, path, include_top=include_top, classes=classes)
