"""Loading image files the way the reference evaluates them."""

import numpy as np

from keras_twins import variants


def load_image(path, image_size=variants.DEFAULT_IMAGE_SIZE, crop_pct=variants.CROP_PCT):
    """Loads an image file as the reference's evaluation transform does.

    Resizes the shorter side to `int(image_size / crop_pct)` with bicubic
    interpolation, center-crops `image_size` x `image_size` and converts to
    RGB (grayscale and RGBA included).

    Returns:
        float32 array `(image_size, image_size, 3)`, pixels in [0, 255].
    """
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("Loading images needs Pillow: pip install pillow") from None
    with Image.open(path) as image:
        if image.mode.startswith("I;16"):
            # 16-bit grayscale (PNG): Pillow's convert("RGB") clips at 255, so
            # nearly every pixel turned white. Keep the high byte, as
            # TensorFlow's decoder does for the training and evaluation data.
            image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
        image = image.convert("RGB")
        width, height = image.size
        short = int(image_size / crop_pct)
        # torchvision's Resize(int): the shorter side to `short`, truncating the other.
        if width <= height:
            size = (short, int(short * height / width))
        else:
            size = (int(short * width / height), short)
        image = image.resize(size, Image.BICUBIC)
        left = int(round((size[0] - image_size) / 2.0))
        top = int(round((size[1] - image_size) / 2.0))
        image = image.crop((left, top, left + image_size, top + image_size))
        return np.asarray(image, dtype=np.float32)
