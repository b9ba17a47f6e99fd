"""The input pipelines of keras_twins.data: image folders, decoding, batches."""

import hashlib
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import image_folder
from conftest import json_config
from conftest import run_cli
from keras_twins import data as data_lib


def test_training_pipeline_shapes_labels_and_mixing(tmp_path):
    split = data_lib.load_split(image_folder(tmp_path / "data", classes=("a", "b", "c")),
                                "train")
    for augment in ("imagenet", "light", "none"):
        one_hot = []
        # The whole epoch: now and then a batch of MixUp or CutMix keeps every
        # label whole (a sample mixed with one of its class, a box of nothing).
        for images, labels in data_lib.training_pipeline(split, (32, 48), 6, augment).take(6):
            assert images.shape == (6, 32, 48, 3) and labels.shape == (6, 3)
            assert 0.0 <= float(np.min(images)) and float(np.max(images)) <= 255.0
            np.testing.assert_allclose(np.sum(labels, axis=-1), 1.0, atol=1e-5)
            one_hot.append(np.all(np.isin(np.asarray(labels), [0.0, 1.0])))
        assert len(one_hot) == 6
        assert all(one_hot) == (augment != "imagenet")  # MixUp/CutMix soften the labels
    evaluation = data_lib.evaluation_pipeline(split, (40, 40), 5)
    assert [tuple(x.shape) for x, _ in evaluation] == [(5, 40, 40, 3)] * 7 + [(1, 40, 40, 3)]
    # Without tf.data's autotuning thread, whose sleep (up to 10 s) deleting
    # an iterator waits out: a 3-step SVT-S fit took 10.24 s instead of 7.
    for pipeline in (data_lib.training_pipeline(split, (32, 48), 6, "none"), evaluation):
        assert pipeline.options().autotune.enabled is False
        assert pipeline.options().autotune.initial_parallelism == len(os.sched_getaffinity(0))


DETERMINISTIC_EPOCHS = """
import hashlib, sys
from keras_twins import data as data_lib
split = data_lib.load_split(sys.argv[1], "train")
for augment in ("imagenet", "light"):
    pipeline = data_lib.training_pipeline(split, (32, 48), 4, augment, seed=int(sys.argv[2]),
                                          deterministic=True)
    for epoch in range(2):
        digest = hashlib.sha256()
        for images, labels in pipeline:
            digest.update(images.numpy().tobytes() + labels.numpy().tobytes())
        print(augment, epoch, digest.hexdigest())
"""


def test_deterministic_pipelines_give_the_same_batches_on_every_run(tmp_path):
    """Augmentation drew its random numbers in the order parallel calls ran:
    two runs with `deterministic=True` trained to weights 5e-5 apart."""
    data = str(image_folder(tmp_path / "data", per_class=24))

    def epochs(seed):
        result = subprocess.run([sys.executable, "-c", DETERMINISTIC_EPOCHS, data, str(seed)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout.split("\n")[:-1]

    first, again, other_seed = epochs(1), epochs(1), epochs(2)
    assert len(first) == 4 and first == again
    digests = [line.split()[-1] for line in first + other_seed]
    # Each epoch and each seed still draws its own crops, flips and mixes.
    assert len(set(digests)) == len(digests)


@pytest.mark.parametrize("cache", [False, True])  # shuffled as file names, or as images
def test_a_pipeline_started_at_an_epoch_gives_that_epochs_batches(tmp_path, cache):
    """Each epoch's shuffle and augmentation followed from the epochs before
    it: a run resumed at epoch 2 got the batches of epoch 0."""
    split = data_lib.load_split(image_folder(tmp_path / "data", per_class=6), "train")
    steps = split.num_examples // 4

    def digests(first_epoch, epochs):
        pipeline = data_lib.training_pipeline(split, (32, 48), 4, "imagenet", seed=5,
                                              cache=cache, deterministic=True,
                                              first_epoch=first_epoch)
        return [hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()
                for images, labels in pipeline.take(epochs * steps)]

    whole = digests(0, 3)
    assert digests(2, 1) == whole[2 * steps:]
    assert len(set(whole)) == len(whole)
    with pytest.raises(data_lib.DataError, match=r"first_epoch must be None or a whole "
                       r"number >= 0\. Received: first_epoch=-1$"):
        data_lib.training_pipeline(split, (32, 48), 4, first_epoch=-1)


def test_parallel_augmentation_gives_each_example_what_the_deterministic_run_does(tmp_path):
    """Keras' RandAugment and random erasing draw from seed generators that
    each call advances: in parallel, which example got which draw depended on
    the threads, so only `deterministic` (one at a time) could repeat a run."""
    split = data_lib.load_split(image_folder(tmp_path / "data", per_class=6), "train")
    policy = data_lib.Augmentation(mixup_alpha=0.0, cutmix_alpha=0.0)

    def examples(deterministic):
        pipeline = data_lib.training_pipeline(split, (32, 48), 1, policy, seed=2,
                                              deterministic=deterministic, first_epoch=4)
        return sorted(hashlib.sha256(images.numpy().tobytes()).hexdigest()
                      for images, _ in pipeline.take(split.num_examples))

    in_order = examples(True)
    assert examples(False) == in_order and len(set(in_order)) == len(in_order)


def test_mixed_images_stay_in_the_pixel_range():
    """MixUp blends two white pixels into 255.00002 by rounding, out of the
    [0, 255] that training_pipeline promises (a fresh-clone run caught it)."""
    import tensorflow as tf

    mix = data_lib._mixer(data_lib.Augmentation.named("imagenet"), seed=3,
                          batch_size=64, image_shape=(8, 8, 3), num_classes=3)
    images = tf.fill([64, 8, 8, 3], 255.0)
    labels = tf.one_hot(tf.range(64) % 3, 3)
    for batch in range(5):
        keys = tf.stack([tf.fill([64], batch), tf.range(64)], axis=1)
        mixed, _, _ = mix(images, labels, tf.cast(keys, tf.int64))
        assert float(tf.reduce_max(mixed)) <= 255.0


def test_corrupt_images_are_skipped_and_counted(tmp_path, capfd):
    data = image_folder(tmp_path / "data", per_class=4)
    (data / "train" / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (data / "train" / "square" / "text.jpg").write_text("not an image")
    # A name that is not UTF-8 (Latin-1 bytes), printed with its byte escaped.
    open(os.path.join(os.fsencode(data / "train" / "square"), b"caf\xe9.jpg"), "wb").close()
    # Jupyter's checkpoint folder is not a class.
    (data / "train" / ".ipynb_checkpoints").mkdir()
    split = data_lib.load_split(data, "train")
    assert split.num_examples == 8 and split.class_names == ["circle", "square"]
    assert (sorted(os.fsencode(os.path.basename(p)) for p in split.skipped)
            == [b"broken.png", b"caf\xe9.jpg", b"text.jpg"])
    # A configuration saved by Windows' Notepad, which begins with a byte-order mark.
    config = json_config(tmp_path)
    config.write_bytes(b"\xef\xbb\xbf" + config.read_bytes())
    code, out, err = run_cli(capfd, "train", "--data", data, "--model", config,
                             "--image-size", "32", "--epochs", "1", "--batch-size", "4",
                             "--augment", "none", "-o", tmp_path / "run")
    assert code == 0, err[-2000:]
    assert "skipped 3 unreadable image file(s)" in out and "caf\\xe9.jpg" in out


def test_file_names_that_are_not_utf8(tmp_path):
    """A Latin-1 file name failed TensorFlow's string conversion with a
    traceback; a class name that is not text cannot go into labels.txt."""
    data = image_folder(tmp_path / "data", per_class=2, splits=("train",))
    circle = os.fsencode(data / "train" / "circle")
    shutil.copy(os.path.join(circle, b"0.png"), os.path.join(circle, b"\xe9t\xe9.png"))
    split = data_lib.load_split(data, "train")
    assert split.num_examples == 5 and split.skipped == []
    assert os.path.join(circle, b"\xe9t\xe9.png") in list(split.paths.numpy())
    assert sum(1 for _ in split.dataset) == 5
    os.mkdir(os.path.join(os.fsencode(data / "train"), b"d\xffg"))
    with pytest.raises(data_lib.DataError) as error:
        data_lib.load_split(data, "train")
    assert str(error.value) == (f"{data / 'train'}: the class folder name b'd\\xffg' is not "
                                "printable text; class names go into labels.txt, so rename it")


def test_a_class_takes_the_images_in_its_sub_folders(tmp_path):
    """As Keras' image_dataset_from_directory and torchvision's ImageFolder
    list a class: images one folder down were left out without a word."""
    data = image_folder(tmp_path / "data", per_class=2, splits=("train",))
    nested = data / "train" / "square" / "2024" / "batch_b"
    nested.mkdir(parents=True)
    shutil.copy(data / "train" / "circle" / "0.png", nested / "extra.PNG")
    (data / "train" / "circle" / ".ipynb_checkpoints").mkdir()
    shutil.copy(data / "train" / "circle" / "0.png",
                data / "train" / "circle" / ".ipynb_checkpoints" / "0-checkpoint.png")
    split = data_lib.load_split(data, "train")
    listed = [(os.path.relpath(path.decode(), data / "train"), int(label))
              for path, label in zip(split.paths.numpy(), split.labels.numpy())]
    assert listed == [("circle/0.png", 0), ("circle/1.png", 0), ("square/0.png", 1),
                      ("square/1.png", 1), ("square/2024/batch_b/extra.PNG", 1)]
    assert split.num_examples == 5 and split.skipped == []


def test_webp_images_without_alpha_are_read_and_others_skipped(tmp_path):
    """.webp files were not listed. TensorFlow decodes an RGBA or animated WebP
    only as RGBA, and asking it for that aborted the process on animated files
    (heap corruption in TensorFlow 2.21), so those are skipped by name."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "data" / "train" / "pets"
    folder.mkdir(parents=True)
    pixels = rng.integers(0, 255, (30, 41, 4), dtype=np.uint8)
    Image.fromarray(pixels[..., :3]).save(folder / "lossy.webp")
    Image.fromarray(pixels[..., :3]).save(folder / "lossless.webp", lossless=True)
    Image.fromarray(pixels, "RGBA").save(folder / "rgba.webp", lossless=True)
    frames = [Image.fromarray(np.roll(pixels[..., :3], i, 0)) for i in range(3)]
    frames[0].save(folder / "animated.webp", save_all=True, append_images=frames[1:])
    (folder / "short.webp").write_bytes(b"RIFF")
    split = data_lib.load_split(tmp_path / "data", "train")
    assert sorted(os.path.basename(p) for p in split.skipped) == [
        "animated.webp", "rgba.webp", "short.webp"]
    decoded = {os.path.basename(path.decode()): image for (image, _), path in
               zip(split.dataset.as_numpy_iterator(), split.paths.numpy())}
    assert sorted(decoded) == ["lossless.webp", "lossy.webp"]
    np.testing.assert_array_equal(decoded["lossless.webp"], pixels[..., :3])
    with Image.open(folder / "lossy.webp") as opened:
        lossy = np.asarray(opened.convert("RGB")).astype(int)
    # libwebp's YUV to RGB conversion may differ from Pillow's by a level or two.
    assert np.abs(decoded["lossy.webp"].astype(int) - lossy).max() <= 3


def test_tiff_images_are_read_as_pillow_reads_them_and_damaged_ones_skipped(tmp_path):
    """TensorFlow has no TIFF decoder: .tif files were left out of the split
    without a word, though `predict` and the int8 calibration read them."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "data" / "train" / "cells"
    folder.mkdir(parents=True)
    pixels = rng.integers(0, 255, (30, 41, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "rgb.png")
    Image.fromarray(pixels).save(folder / "rgb.tif")
    Image.fromarray(pixels).save(folder / "lzw.TIFF", compression="tiff_lzw")
    # 16-bit grayscale: the high byte, as TensorFlow's PNG decoder keeps it.
    Image.fromarray(pixels[..., 0].astype(np.int32) * 256 + 255).save(folder / "gray16.tif")
    (folder / "short.tif").write_bytes(b"II*\x00" + bytes(20))
    (tmp_path / "data" / "train" / "empty").mkdir()
    (tmp_path / "data" / "train" / "empty" / "only.tiff").write_text("not an image")
    split = data_lib.load_split(tmp_path / "data", "train")
    assert sorted(os.path.basename(p) for p in split.skipped) == ["only.tiff", "short.tif"]
    decoded = {os.path.basename(path.decode()): image for (image, _), path in
               zip(split.dataset.as_numpy_iterator(), split.paths.numpy())}
    assert sorted(decoded) == ["gray16.tif", "lzw.TIFF", "rgb.png", "rgb.tif"]
    for name in ["rgb.tif", "lzw.TIFF"]:
        np.testing.assert_array_equal(decoded[name], decoded["rgb.png"])
    np.testing.assert_array_equal(decoded["gray16.tif"],
                                  np.repeat(pixels[..., :1], 3, axis=-1))
    batches = data_lib.training_pipeline(split, (32, 32), 2, augment="light")
    images, labels = next(iter(batches))
    assert images.shape == (2, 32, 32, 3) and labels.shape == (2, 2)


def test_percent_slices_of_a_folder_split_each_class_apart(tmp_path):
    """A folder with only train could not hold out a validation part, as
    Keras' validation_split and tensorflow-datasets' 'train[90%:]' do."""
    data = image_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=10,
                        splits=("train",))
    for i in range(10, 25):  # b: 25 images
        shutil.copy(data / "train" / "b" / "0.png", data / "train" / "b" / f"{i}.png")
    whole, first, rest = (data_lib.load_split(data, split)
                          for split in ("train", "train[:90%]", "train[90%:]"))
    listed = [set(split.paths.numpy()) for split in (whole, first, rest)]
    assert listed[1] | listed[2] == listed[0] and not listed[1] & listed[2]
    # Each class apart: 9 + 1, 23 + 2 (22.5 rounded up), 9 + 1.
    assert list(np.bincount(first.labels.numpy())) == [9, 23, 9]
    assert list(np.bincount(rest.labels.numpy())) == [1, 2, 1]
    assert first.num_examples == 41 and rest.num_examples == 4
    assert data_lib.load_split(data, "train[10%:20%]").num_examples == 4  # 1 + 2 + 1
    # Not each class's last files by name (which would hold out, say, the
    # newest photos of a camera's numbering): an order of their own.
    by_name = {c: sorted(path for path in listed[0] if f"/{c}/".encode() in path) for c in "abc"}
    assert listed[2] != set(by_name["a"][-1:] + by_name["b"][-2:] + by_name["c"][-1:])
    for bad in ("train[90:]", "train[:120%]", "train[50%:50%]", "train[x%:]"):
        with pytest.raises(data_lib.DataError, match=re.escape(
                f"{bad!r}: an image folder's splits take percent slices")):
            data_lib.load_split(data, bad)
    with pytest.raises(data_lib.DataError, match=r"no 'validation' split \(found: train\)"):
        data_lib.load_split(data, "validation[:50%]")
