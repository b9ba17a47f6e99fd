"""Loading image files the way the reference evaluates them."""

import os

import numpy as np

from keras_twins import variants
from keras_twins.checks import is_whole


def load_image(path, image_size=variants.DEFAULT_IMAGE_SIZE, crop_pct=variants.CROP_PCT,
               channels=3):
    """Loads an image file as the reference's evaluation transform does.

    `path` is a file path, a binary file object (`io.BytesIO(data)` for the
    bytes of an image file), or an open Pillow image, as timm's transforms
    take.

    Converts to RGB (grayscale, RGBA and 16-bit included), resizes with
    bicubic interpolation and crops the center, as timm's evaluation
    transform does: for a square `image_size`, the shorter side to
    `int(image_size / crop_pct)`; for `(height, width)`, the aspect ratio
    kept and the tighter side fitted to `int(height / crop_pct)` or
    `int(width / crop_pct)` (timm's `ResizeKeepRatio`, which timm runs
    bilinear; bicubic here, as for square sizes).

    With `channels=1`, for a grayscale model, the RGB crop's gray (`grayscale`).

    Returns:
        float32 array `(height, width, channels)`, pixels in [0, 255].
    """
    check_channels(channels)
    image = _rgb_crop(path, image_size, crop_pct)
    return grayscale(image) if channels == 1 else image


def _rgb_crop(path, image_size, crop_pct):
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("Loading images needs Pillow: pip install pillow") from None
    crop_height, crop_width = _crop_size(image_size)
    if isinstance(path, Image.Image):
        return _evaluation_crop(path, crop_height, crop_width, crop_pct)
    is_path = isinstance(path, (str, os.PathLike)) or (
        isinstance(path, bytes) and b"\0" not in path)
    if not is_path and not hasattr(path, "read"):
        # Pillow's "embedded null byte", or "'numpy.ndarray' object has no attribute 'read'".
        what = ("the bytes of an image file" if isinstance(path, (bytes, bytearray))
                else type(path).__name__)
        raise TypeError("load_image takes a path, a binary file object (io.BytesIO(data) "
                        f"for an image file's bytes) or a Pillow image. Received: {what}")
    try:
        with Image.open(path) as image:
            return _evaluation_crop(image, crop_height, crop_width, crop_pct)
    except Image.DecompressionBombError as error:
        # Not an OSError, which callers that skip unreadable files catch.
        raise ValueError(f"{path}: {error} Raise PIL.Image.MAX_IMAGE_PIXELS to read it.") \
            from None


def _evaluation_crop(image, crop_height, crop_width, crop_pct):
    """`load_image`'s resize and crop of an open Pillow image."""
    from PIL import Image

    image = rgb(image)
    width, height = image.size
    if crop_height == crop_width:
        short = int(crop_height / crop_pct)
        # torchvision's Resize(int): the shorter side to `short`, truncating the other.
        if width <= height:
            size = (short, int(short * height / width))
        else:
            size = (int(short * width / height), short)
    else:
        ratio = min(height / int(crop_height / crop_pct), width / int(crop_width / crop_pct))
        size = (round(width / ratio), round(height / ratio))
    image = image.resize(size, Image.BICUBIC)
    left = int(round((size[0] - crop_width) / 2.0))
    top = int(round((size[1] - crop_height) / 2.0))
    image = image.crop((left, top, left + crop_width, top + crop_height))
    return np.asarray(image, dtype=np.float32)


def rgb(image):
    """An open Pillow image as an RGB one, 16-bit grayscale by its high byte.

    Pillow opens 16-bit grayscale as I;16 (PNG) or 32-bit I (PGM, TIFF and
    older Pillows' PNG), and its convert("RGB") clips those at 255, so
    nearly every pixel turned white. The high byte is what TensorFlow's
    decoder keeps for the training and evaluation data.
    """
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        image = Image.fromarray(np.clip(np.asarray(image) >> 8, 0, 255).astype(np.uint8))
    return image.convert("RGB")


def _crop_size(image_size):
    """`(height, width)` from an int or a pair, each a whole number of at least 1."""
    size = tuple(image_size) if np.ndim(image_size) else (image_size, image_size)
    if len(size) != 2 or not all(is_whole(side, least=1) for side in size):
        raise ValueError("`image_size` must be a whole number of pixels or (height, width). "
                         f"Received: image_size={image_size!r}")
    return size


# What image files are read as: RGB, or its gray (`grayscale`) for a model of one channel.
FILE_CHANNELS = (1, 3)
# ITU-R BT.601 luma: the weights of R, G and B in Pillow's convert("L").
LUMA = (0.299, 0.587, 0.114)


def check_channels(channels, error=ValueError):
    """Refuses, with `error`, a channel count that image files are not read as."""
    if isinstance(channels, bool) or channels not in FILE_CHANNELS:
        raise error("image files are read as RGB or grayscale: `channels` must be 3 or 1. "
                    f"Received: channels={channels!r}")


def grayscale(images):
    """RGB pixels `(..., 3)` as one gray channel, `(..., 1)`, in the same range."""
    return np.asarray(images, np.float32) @ np.array(LUMA, np.float32)[:, None]
