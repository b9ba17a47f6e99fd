import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# torch (with timm and torchvision) must load before TensorFlow: the other
# order crashes the process on import (a clash of their bundled libraries).
import timm  # noqa: E402,F401
import torch  # noqa: E402,F401

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

# A Twins small enough to build in a second; PCPVT when window_sizes is None.
TINY = dict(
    embed_dims=(8, 16, 24, 32),
    depths=(1, 2, 1, 2),
    num_heads=(1, 2, 3, 4),
    mlp_ratios=(2, 2, 2, 2),
    sr_ratios=(8, 4, 2, 1),
    window_sizes=(7, 7, 7, 7),
)
TINY_PCPVT = {**TINY, "window_sizes": None}
# Two stages, the second's GSA sub-sampling by 2: an SVT that takes 16x16 images.
TWO_STAGES = dict(embed_dims=(8, 16), depths=(1, 2), num_heads=(1, 2), mlp_ratios=(2, 2),
                  sr_ratios=(8, 2), window_sizes=(7, 7))


# The files that take longest, in the order they start. Under `--dist loadfile`
# each worker takes whole files, and xdist's default order (by number of
# tests) left files of few long tests (the demo, segmentation) to end the run
# alone on one core; the Makefile turns that order off.
SLOWEST_FIRST = ("test_export.py", "test_training.py", "test_segmentation.py",
                 "test_model.py", "test_parity.py", "test_demo.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FIRST)))


def write_oversized_png(path, side=20000):
    """A small PNG file whose header claims side x side pixels, beyond Pillow's limit."""
    import struct
    import zlib

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    rows = zlib.compress(b"\0" * (1 + 3 * side) * 4)
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows)
                     + chunk(b"IEND", b""))


def max_difference(a, b):
    """The largest absolute difference between two lists of weight arrays."""
    assert len(a) == len(b)
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def max_error_within_tolerance(actual, reference):
    """The parity criterion: max|a - r| <= 1e-5 * max(1, max|r|)."""
    error = float(np.max(np.abs(actual - reference)))
    bound = 1e-5 * max(1.0, float(np.max(np.abs(reference))))
    return error <= bound, error, bound


@pytest.fixture(scope="session")
def random_reference(tmp_path_factory):
    """timm models with random weights, saved as .pth and .safetensors.

    LayerNorm scales and all biases are randomized too, so a weight that
    lands in the wrong place (or a norm with the wrong epsilon) shows.
    """
    cache = {}

    def make(variant, num_classes=1000):
        key = (variant, num_classes)
        if key in cache:
            return cache[key]
        import safetensors.torch

        torch.manual_seed(len(cache))
        model = timm.create_model(variant, pretrained=False, num_classes=num_classes)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if parameter.ndim == 1:
                    offset = 1.0 if name.endswith("weight") and "norm" in name else 0.0
                    parameter.copy_(torch.randn_like(parameter) * 0.5 + offset)
        model.eval()
        directory = tmp_path_factory.mktemp(f"{variant}_{num_classes}")
        state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save(state_dict, directory / "model.pth")
        safetensors.torch.save_file(state_dict, str(directory / "model.safetensors"))
        cache[key] = (model, directory)
        return cache[key]

    return make


@pytest.fixture
def channels_first_by_default():
    """`keras.config.image_data_format()` at "channels_first", as a keras.json can set it."""
    import keras

    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    yield
    keras.config.set_image_data_format(previous)


def image_folder(root, classes=("circle", "square"), per_class=12, splits=("train", "validation"),
                 size=(36, 44)):
    """Random RGB images in the ImageFolder layout, of uneven sizes."""
    rng = np.random.default_rng(0)
    for split in splits:
        for label in classes:
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                shape = (size[0] + i % 3, size[1] + i % 5, 3)
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(
                    folder / f"{i}.png")
    return root


def json_config(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def run_cli(capfd, *args):
    """`keras-twins ARGS` in this process: (exit code, stdout, stderr); a usage
    error's SystemExit gives its code, as the process would."""
    from keras_twins import cli

    try:
        code = cli.main(list(map(str, args)))
    except SystemExit as exit_:
        code = exit_.code
    captured = capfd.readouterr()
    return code, captured.out, captured.err
