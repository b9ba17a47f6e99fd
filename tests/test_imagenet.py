"""Class names, decode_predictions, preprocess_input and the evaluation image loader."""

import io
import os
import re

import numpy as np
import pytest
from PIL import Image

import keras_twins
from conftest import write_oversized_png
from keras_twins.imagenet import imagenet_classes


def test_class_names_ship_with_the_package():
    classes = imagenet_classes()
    assert len(classes) == 1000
    assert len({wnid for wnid, _ in classes}) == 1000
    assert len({name for _, name in classes}) == 1000
    assert classes[0] == ("n01440764", "tench")
    assert [wnid for wnid, _ in classes] == sorted(wnid for wnid, _ in classes)


def test_decode_predictions_ranks_classes():
    preds = np.zeros((2, 1000), np.float32)
    preds[0, [3, 7, 1]] = [0.5, 0.3, 0.2]
    preds[1, 999] = 1.0
    decoded = keras_twins.decode_predictions(preds, top=3)
    assert [entry[0][:2] for entry in decoded] == [imagenet_classes()[3], imagenet_classes()[999]]
    assert [score for *_, score in decoded[0]] == pytest.approx([0.5, 0.3, 0.2])
    with pytest.raises(ValueError, match=r"Received array with shape: \(2, 10\)"):
        keras_twins.decode_predictions(np.zeros((2, 10)))


def test_preprocess_input_is_the_identity_for_models_that_normalize_inside():
    x = np.random.default_rng(0).uniform(0, 255, (1, 8, 8, 3))
    assert keras_twins.preprocess_input(x) is x


def china(mode, size):
    import sklearn.datasets

    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    return Image.open(os.path.join(folder, "china.jpg")).convert(mode).resize(size)


def timm_evaluation_transform(crop):
    """timm's evaluation transform at `crop` = (height, width), bicubic, pixels in [0, 1]."""
    import timm.data
    from timm.data.transforms import ResizeKeepRatio
    from torchvision import transforms

    if crop[0] == crop[1]:
        return timm.data.create_transform(input_size=(3, *crop), crop_pct=0.9,
                                          interpolation="bicubic", mean=(0, 0, 0), std=(1, 1, 1))
    # timm's own non-square transform is this with ResizeKeepRatio's default
    # bilinear; keras_twins stays bicubic at every size.
    return transforms.Compose([
        ResizeKeepRatio(tuple(int(side / 0.9) for side in crop), interpolation="bicubic"),
        transforms.CenterCrop(crop), transforms.ToTensor()])


# Sizes whose resize rounds, whose crop offset is a half pixel (rounded to
# even), and non-square crops (resized keeping the aspect ratio).
SIZES = [((333, 217), (224, 224)), ((331, 248), (224, 224)), ((100, 77), (32, 32)),
         ((640, 427), (96, 128)), ((200, 300), (130, 97))]


@pytest.mark.parametrize("mode, size, crop", [
    ("RGB", (333, 217), (224, 224)), ("L", (97, 131), (224, 224)),
    ("RGBA", (250, 181), (224, 224)), ("RGB", (224, 600), (224, 224)),
    *[("RGB", size, crop) for size, crop in SIZES[1:]],
])
def test_load_image_matches_timm_evaluation_transform(mode, size, crop, tmp_path):
    path = tmp_path / "image.png"
    china(mode, size).save(path)
    with Image.open(path) as opened:
        expected = timm_evaluation_transform(crop)(opened.convert("RGB"))
    expected = expected.numpy().transpose(1, 2, 0) * 255
    loaded = keras_twins.load_image(path, crop if crop[0] != crop[1] else crop[0])
    assert loaded.shape == (*crop, 3) and loaded.dtype == np.float32
    np.testing.assert_allclose(loaded, expected, atol=1e-3)


@pytest.mark.parametrize("size, crop", SIZES)
def test_the_evaluation_pipeline_crops_as_timm_does(size, crop):
    """The TensorFlow transform behind `evaluate` and validation: its crop was a
    pixel off when the margin was 3 modulo 4, its long side rounded where
    torchvision truncates, and a non-square crop squashed the image."""
    import tensorflow as tf
    from keras_twins import data

    image = china("RGB", size)
    expected = timm_evaluation_transform(crop)(image).numpy().transpose(1, 2, 0) * 255
    cropped = data.center_crop(tf.constant(np.asarray(image)), crop).numpy()
    # TensorFlow's bicubic resize against Pillow's, which rounds to 8 bits:
    # a one-pixel shift differs by 10 levels on average on this photograph.
    assert np.abs(cropped - expected).mean() < 0.5
    assert np.abs(cropped - expected).max() < 8


def test_a_16_bit_grayscale_image_loads_as_its_8_bit_image(tmp_path):
    """Pillow's convert("RGB") clipped 16-bit values at 255: the image came out white.

    Pillow opens a 16-bit PNG as I;16, and a PGM or TIFF (and, in older
    versions, a PNG) as 32-bit I.
    """
    import tensorflow as tf

    high = np.random.default_rng(0).integers(0, 256, (97, 131)).astype(np.uint16)
    wide = high * 256 + np.random.default_rng(1).integers(0, 256, high.shape).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "gray16.png")
    Image.fromarray(wide).save(tmp_path / "gray16.pgm")
    Image.fromarray(wide.astype(np.int32)).save(tmp_path / "gray16.tif")
    Image.fromarray(high.astype(np.uint8)).save(tmp_path / "gray8.png")
    expected = keras_twins.load_image(tmp_path / "gray8.png")
    for name, mode in [("gray16.png", "I;16"), ("gray16.pgm", "I"), ("gray16.tif", "I")]:
        with Image.open(tmp_path / name) as image:
            assert image.mode == mode
        np.testing.assert_array_equal(keras_twins.load_image(tmp_path / name), expected)
    # The training and evaluation pipelines decode with TensorFlow: the same pixels.
    decoded = tf.io.decode_png(tf.io.read_file(str(tmp_path / "gray16.png")), channels=3)
    np.testing.assert_array_equal(decoded.numpy()[..., 0], high)


def test_load_image_takes_a_pillow_image_or_a_file_object(tmp_path):
    """A Pillow image was "'PngImageFile' object has no attribute 'read'"."""
    china("RGB", (333, 217)).save(tmp_path / "image.png")
    expected = keras_twins.load_image(tmp_path / "image.png", 96)
    with Image.open(tmp_path / "image.png") as image:
        np.testing.assert_array_equal(keras_twins.load_image(image, 96), expected)
        assert image.size == (333, 217)  # the caller's image, unchanged
    data = (tmp_path / "image.png").read_bytes()
    np.testing.assert_array_equal(keras_twins.load_image(io.BytesIO(data), 96), expected)
    # An array was the same AttributeError, and an image file's bytes Pillow's
    # "embedded null byte".
    for bad, what in ((np.zeros((40, 40, 3), np.uint8), "ndarray"),
                      (data, "the bytes of an image file")):
        with pytest.raises(TypeError, match=re.escape(
                "load_image takes a path, a binary file object (io.BytesIO(data) for an "
                f"image file's bytes) or a Pillow image. Received: {what}")):
            keras_twins.load_image(bad)


@pytest.mark.parametrize("size", [0, (224, 224, 3), 22.5, (0, 10)])
def test_load_image_names_a_bad_size(size, tmp_path):
    """PIL's "height and width must be > 0" or an unpacking error before."""
    china("RGB", (40, 30)).save(tmp_path / "image.png")
    with pytest.raises(ValueError, match=re.escape(f"Received: image_size={size!r}")):
        keras_twins.load_image(tmp_path / "image.png", size)


def test_an_image_beyond_pillows_pixel_limit_is_a_value_error_naming_it(tmp_path):
    """Pillow's DecompressionBombError is no OSError: `predict` printed a traceback."""
    write_oversized_png(tmp_path / "huge.png")
    with pytest.raises(ValueError, match=r"huge\.png: .*MAX_IMAGE_PIXELS"):
        keras_twins.load_image(tmp_path / "huge.png")
