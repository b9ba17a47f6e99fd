"""tf.data input pipelines for training and evaluating Twins classifiers.

Two kinds of source give the same thing, decoded RGB images with integer
labels:

- `"tfds:NAME"`: a tensorflow-datasets image-classification dataset (for
  ImageNet, `tfds:imagenet2012` with the archives in its manual directory).
- a folder in the `tfds.ImageFolder` layout, `ROOT/SPLIT/LABEL/*.jpg|png|webp`
  (or jpeg, bmp, gif, tif, tiff), a class's sub-folders included.
  Unreadable files are found before training, skipped and counted.

Either takes a slice of a split, `"train[:90%]"`, as tensorflow-datasets
writes it (a folder: percent slices, of each class apart).

`training_pipeline` adds the paper's augmentation (DeiT's): random-resized
crop, flip, RandAugment, random erasing, then MixUp or CutMix per batch;
`evaluation_pipeline` resizes the shorter side to `size / 0.9` and takes the
center crop, as the references evaluate.
"""

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import re

import keras
import numpy as np
import tensorflow as tf

from keras_twins import cpu_streams, variants
from keras_twins.checks import is_whole
from keras_twins.images import LUMA
from keras_twins.images import check_channels as check_file_channels

TFDS_PREFIX = "tfds:"
# TIFF has no TensorFlow decoder; those files are read with Pillow.
PILLOW_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp") + PILLOW_SUFFIXES
VALIDATION_SPLITS = ("validation", "val", "test")
AUGMENTATIONS = ("imagenet", "light", "none")
# Images are (height, width, 3) whatever keras.config.image_data_format() says,
# so Keras' augmentation layers are told so.
CHANNELS_LAST = dict(data_format="channels_last")


class DataError(ValueError):
    """The data cannot be used; the message says what and where."""


@dataclasses.dataclass
class Split:
    """One split of a source: decoded examples and what is known about them.

    Attributes:
        dataset: `tf.data.Dataset` of `(uint8 image (H, W, 3), int32 label)`,
            not shuffled; folders list their files in sorted order.
        class_names: the label names, indexed by label.
        num_examples: how many examples `dataset` yields.
        skipped: files of the split that could not be decoded (folders).
        paths, labels: for folders, the files and their labels in `dataset`
            order (`training_pipeline` shuffles these before decoding).
    """

    dataset: tf.data.Dataset
    class_names: list
    num_examples: int
    skipped: list = dataclasses.field(default_factory=list)
    paths: tf.Tensor = None
    labels: tf.Tensor = None


def load_split(source, split, data_dir=None, manual_dir=None):
    """Loads `split` of `source` (`"tfds:NAME"` or an image folder).

    Raises:
        DataError: unknown dataset or split, no images, or no labels.
    """
    source = os.fspath(source)
    if source.startswith(TFDS_PREFIX):
        return _tfds_split(source[len(TFDS_PREFIX):], split, data_dir, manual_dir)
    return _folder_split(source, split)


def split_names(source, data_dir=None, manual_dir=None):
    """The split names that `source` offers."""
    source = os.fspath(source)
    if source.startswith(TFDS_PREFIX):
        builder = _tfds_builder(source[len(TFDS_PREFIX):], data_dir, manual_dir)
        return list(builder.info.splits)
    if not os.path.isdir(source):
        raise DataError(f"{source}: no such folder (expected ROOT/SPLIT/LABEL/*.jpg|png|webp "
                        "or tfds:NAME)")
    return _subfolders(source)


def _subfolders(folder):
    """The sorted sub-folder names, without hidden ones (.ipynb_checkpoints and kin)."""
    return sorted(d for d in os.listdir(folder)
                  if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))


def default_validation_split(source, data_dir=None, manual_dir=None):
    """The first of validation, val, test that `source` has, else `None`."""
    names = split_names(source, data_dir, manual_dir)
    return next((name for name in VALIDATION_SPLITS if name in names), None)


def evaluation_split(source, data_dir=None, manual_dir=None):
    """The split to evaluate on: the first of validation, val, test and train."""
    wanted = (*VALIDATION_SPLITS, "train")
    names = split_names(source, data_dir, manual_dir)
    name = next((name for name in wanted if name in names), None)
    if name is not None:
        return name
    if os.fspath(source).startswith(TFDS_PREFIX):
        # Mocked builders (tfds.testing.mock_data) list no splits and accept any.
        if not names:
            return "train"
        raise DataError(f"{source} has no {_either(wanted)} split (found: {', '.join(names)})")
    raise _no_split(source, wanted)


def check_same_classes(train, validation, validation_name):
    if train.class_names != validation.class_names:
        missing = sorted(set(train.class_names) - set(validation.class_names))
        extra = sorted(set(validation.class_names) - set(train.class_names))
        raise DataError(
            f"the {validation_name} split's classes differ from the train split's "
            f"(missing: {', '.join(missing) or 'none'}; not in train: "
            f"{', '.join(extra) or 'none'}); both must hold the same class folders"
        )


def check_every_class_has_images(split, split_name):
    """Refuses a split of image folders in which a class has no readable image.

    Keras' `image_dataset_from_directory` keeps such a class without a word,
    and the model then trains an output that no example ever asks for.
    """
    if split.labels is None:  # tensorflow-datasets: its classes are its own
        return
    counts = np.bincount(split.labels.numpy(), minlength=len(split.class_names))
    empty = [name for name, count in zip(split.class_names, counts) if not count]
    if len(empty) == 1:
        raise DataError(f"the {split_name} split's class folder '{empty[0]}' holds no "
                        "readable image; add images or remove the folder")
    if empty:
        listed = ", ".join(f"'{name}'" for name in empty)
        listed = listed if len(listed) <= 200 else listed[:200] + "..."
        raise DataError(f"the {split_name} split's class folders {listed} hold no "
                        "readable image; add images or remove the folders")


# --- image folders -------------------------------------------------------


def _folder_split(root, split):
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such folder (expected ROOT/SPLIT/LABEL/*.jpg|png|webp "
                        "or tfds:NAME)")
    split, start, end = _percent_slice(split)
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise _no_split(root, (split,))
    class_names = _subfolders(folder)
    for name in class_names:
        if not name.isprintable():  # undecodable bytes (surrogates) or control characters
            raise DataError(f"{folder}: the class folder name {os.fsencode(name)!r} is not "
                            "printable text; class names go into labels.txt, so rename it")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        found = _image_files(os.path.join(folder, name))
        if (start, end) != (0, 100):
            found = _slice_of_class(found, folder, start, end)
        paths += found
        labels += [label] * len(found)
    if not paths:
        where = " in class folders" if _holds_images(folder) else ""
        raise DataError(f"{folder}: no images found{where} "
                        f"(expected {folder}/LABEL/*.jpg|png|webp)")
    readable = _readable(paths)
    skipped = [path for path in paths if path not in readable]
    kept = [(path, label) for path, label in zip(paths, labels) if path in readable]
    if not kept:
        raise DataError(f"{folder}: none of its {len(paths)} image files can be decoded")
    # As bytes: a file name need not be UTF-8, and TensorFlow's strings are bytes.
    paths = tf.constant([os.fsencode(path) for path, _ in kept])
    labels = tf.constant([label for _, label in kept], tf.int32)
    dataset = tf.data.Dataset.from_tensor_slices((paths, labels)).map(
        _decode_file, num_parallel_calls=tf.data.AUTOTUNE)
    return Split(dataset, class_names, len(kept), skipped, paths, labels)


# 'train[:90%]', 'train[90%:]', 'train[10%:20%]': percent slices, written as tfds writes them.
_PERCENT_SLICE = re.compile(r"(?P<name>[^\[\]]+)\[(?:(?P<start>\d+)%)?:(?:(?P<end>\d+)%)?\]")


def _percent_slice(split):
    """`(name, start, end)` of a folder's split: `'train'` or a percent slice of it."""
    if "[" not in split:
        return split, 0, 100
    match = _PERCENT_SLICE.fullmatch(split)
    start = int(match["start"] or 0) if match else 0
    end = int(match["end"] or 100) if match else 100
    if not match or not start < end <= 100:
        raise DataError(f"{split!r}: an image folder's splits take percent slices, as "
                        "'train[:90%]' and 'train[90%:]' (from 0% to 100%, start before end)")
    return match["name"], start, end


def _slice_of_class(files, folder, start, end):
    """The part `[start%, end%)` of one class's files.

    Each class is sliced on its own, so every class is in both parts of
    `train[:90%]` and `train[90%:]` (given ten or more images). The order is
    fixed by a hash of each file's path within the split, the same on every
    run and machine, so the two parts never share a file.
    """
    ordered = sorted(files, key=lambda path: hashlib.sha256(
        os.fsencode(os.path.relpath(path, folder))).digest())
    bounds = [(len(files) * percent + 50) // 100 for percent in (start, end)]
    return sorted(ordered[bounds[0]:bounds[1]])


def _no_split(root, wanted):
    """The error for an image folder that has none of the splits `wanted`."""
    found = split_names(root)
    message = f"{root}: no {_either(wanted)} split (found: {', '.join(found) or 'no sub-folders'})"
    if any(_holds_images(os.path.join(root, name)) for name in found):
        # Keras' image_dataset_from_directory takes a folder of class folders.
        message += (f"; its sub-folders hold images, as one split's class folders do: "
                    f"the layout is ROOT/SPLIT/LABEL/*.jpg, so move them into "
                    f"{os.path.join(root, wanted[0])}")
    elif _holds_images(root):
        message += "; its images are not in class folders: the layout is ROOT/SPLIT/LABEL/*.jpg"
    return DataError(message)


def _either(names):
    """'a', 'a' or 'b', 'a', 'b' or 'c'."""
    quoted = [f"'{name}'" for name in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _holds_images(folder):
    """Whether image files lie directly in `folder`."""
    return any(name.lower().endswith(IMAGE_SUFFIXES) and
               os.path.isfile(os.path.join(folder, name)) for name in os.listdir(folder))


def _image_files(folder):
    """The image files in `folder` and its sub-folders, sorted by path.

    As Keras' `image_dataset_from_directory` and torchvision's `ImageFolder`
    list a class: images in a sub-folder of a class folder were left out
    without a word. Hidden folders (`.ipynb_checkpoints`) are not entered,
    nor links to folders (a link may loop).
    """
    found = []
    for directory, subfolders, files in os.walk(folder):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        found += [os.path.join(directory, file) for file in files
                  if file.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found)


def _decode_file(path, label):
    image = tf.cond(
        _read_by_pillow(path),
        lambda: tf.numpy_function(_pillow_decode, [path], tf.uint8, stateful=False),
        lambda: _tensorflow_decode(path),
    )
    return tf.ensure_shape(image, [None, None, 3]), label


def _read_by_pillow(path):
    suffixes = "|".join(re.escape(suffix) for suffix in PILLOW_SUFFIXES)
    return tf.strings.regex_full_match(tf.strings.lower(path), f".*({suffixes})")


def _tensorflow_decode(path):
    return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)


def _pillow_decode(path):
    """The first frame of a file TensorFlow cannot decode, as RGB uint8."""
    from PIL import Image

    from keras_twins.images import rgb

    with Image.open(os.fsdecode(path)) as image:
        return np.asarray(rgb(image), dtype=np.uint8)


def _pillow_height(path):
    """The height of the decoded file, or -1 where Pillow cannot decode it.

    Not an error: TensorFlow logs each error of a Python function with its
    traceback.
    """
    try:
        return np.int64(_pillow_decode(path).shape[0])
    except Exception:  # a damaged file fails anywhere in Pillow's decoders
        return np.int64(-1)


def _readable(paths):
    """The paths whose files decode, found in one parallel pass."""

    def height(path):
        return tf.cond(
            _read_by_pillow(path),
            lambda: tf.numpy_function(_pillow_height, [path], tf.int64, stateful=False),
            lambda: tf.shape(_tensorflow_decode(path), out_type=tf.int64)[0],
        )

    check = tf.data.Dataset.from_tensor_slices([os.fsencode(path) for path in paths]).map(
        lambda path: (path, height(path)), num_parallel_calls=tf.data.AUTOTUNE,
    ).ignore_errors().filter(lambda path, height: height > 0)
    return {os.fsdecode(path) for path, _ in check.as_numpy_iterator()}


# --- tensorflow-datasets -------------------------------------------------


def _tfds_builder(name, data_dir=None, manual_dir=None):
    """The builder of `name`, prepared (downloaded, or read from manual_dir)."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"unknown tensorflow-datasets name {name!r} (see "
                        "https://www.tensorflow.org/datasets/catalog)") from None
    try:
        with _few_download_retries():
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except (ValueError, AssertionError, OSError) as error:
        # e.g. ImageNet's archives are not in the manual directory
        reason = " ".join(str(error).split())
        if type(error).__name__ in ("ConnectionError", "ConnectTimeout"):  # requests'
            reason += (f" (no network? Prepare it where there is one, `tfds build {name}`, "
                       "and point --data-dir (data_dir) at its folder)")
        raise DataError(f"tfds:{name} cannot be prepared: {reason}") from None
    return builder


# tensorflow-datasets retries each request 10 times with doubling waits: a
# host it cannot reach (no network) failed after 3.4 minutes of "Retrying"
# warnings. Five retries give up in about 6 seconds.
DOWNLOAD_RETRIES = 5


@contextlib.contextmanager
def _few_download_retries():
    """tensorflow-datasets' downloads retry `DOWNLOAD_RETRIES` times meanwhile,
    without urllib3's warning per retry."""
    from tensorflow_datasets.core.download import downloader

    retries = getattr(downloader, "MAX_RETRIES", None)
    urllib3_log = logging.getLogger("urllib3.connectionpool")
    level = urllib3_log.level
    if retries is not None:
        downloader.MAX_RETRIES = min(retries, DOWNLOAD_RETRIES)
    urllib3_log.setLevel(logging.ERROR)  # the final error names the cause
    try:
        yield
    finally:
        if retries is not None:
            downloader.MAX_RETRIES = retries
        urllib3_log.setLevel(level)


def _tfds_split(name, split, data_dir, manual_dir):
    builder = _tfds_builder(name, data_dir, manual_dir)
    info = builder.info
    if info.supervised_keys is None:
        raise DataError(f"tfds:{name} has no (image, label) supervised keys")
    label_feature = info.features[info.supervised_keys[1]]
    if not hasattr(label_feature, "names"):
        raise DataError(f"tfds:{name}: '{info.supervised_keys[1]}' is not a class label")
    # Mocked builders (tfds.testing.mock_data) list no splits and accept any.
    num_examples = None
    if info.splits:
        try:  # a split, or tfds' slices of splits: 'train[:90%]', 'train[2:5]+test'
            num_examples = info.splits[split].num_examples
        except (KeyError, ValueError) as error:
            if split.isidentifier():
                raise DataError(f"tfds:{name} has no split {split!r} "
                                f"(found: {', '.join(info.splits)})") from None
            raise DataError(f"tfds:{name}: {' '.join(str(error).split())}") from None
        if not num_examples:
            raise DataError(f"tfds:{name}: the split {split!r} holds no examples")
    dataset = builder.as_dataset(split=split, as_supervised=True)
    if num_examples is None:
        num_examples = int(dataset.cardinality())
    dataset = dataset.map(
        lambda image, label: (_three_channels(image), tf.cast(label, tf.int32)),
        num_parallel_calls=tf.data.AUTOTUNE)
    return Split(dataset, list(label_feature.names), num_examples)


def _three_channels(image):
    # TensorFlow's image convention, as `tf.io.decode_image` applies to a
    # 16-bit PNG in a folder: uint16 keeps its high byte, float32 is read as
    # [0, 1]. A plain cast wrapped uint16 and truncated [0, 1] floats to 0.
    image = tf.image.convert_image_dtype(image, tf.uint8, saturate=True)
    if image.shape.rank == 2:
        image = image[..., None]
    channels = tf.shape(image)[-1]
    image = tf.cond(channels == 1, lambda: tf.image.grayscale_to_rgb(image[..., :1]),
                    lambda: image[..., :3])
    return tf.ensure_shape(image, [None, None, 3])


# --- pipelines -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """What `training_pipeline` does to each image and batch.

    The `imagenet` defaults are the paper's (DeiT's) regularization.
    """

    crop_scale: tuple = (0.08, 1.0)
    crop_ratio: tuple = (3 / 4, 4 / 3)
    flip: bool = True
    rand_augment_magnitude: float = 9.0  # of 10; 0 turns RandAugment off
    random_erasing: float = 0.25
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_switch_prob: float = 0.5  # CutMix instead of MixUp, per batch

    @classmethod
    def named(cls, name):
        if name == "imagenet":
            return cls()
        if name == "light":
            return cls(crop_scale=(0.35, 1.0), rand_augment_magnitude=0.0,
                       random_erasing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0)
        if name == "none":
            return None
        raise DataError(f"augment must be one of {', '.join(AUGMENTATIONS)}. "
                        f"Received: augment={name!r}")


def training_pipeline(split, image_size, global_batch_size, augment="imagenet",
                      seed=0, cache=False, deterministic=False, channels=3, first_epoch=None):
    """Shuffled, augmented batches of `(float32 images in [0, 255], one-hot labels)`.

    Each epoch's order and augmentation come from the seed and the epoch's
    number, not from the epochs before it: a run resumed at epoch `k` is
    given what an uninterrupted one was at `k` (the same batches, with
    `deterministic`).

    Args:
        split: a `Split` from `load_split`.
        image_size: `(height, width)` of the crops.
        global_batch_size: examples per step over all replicas; each epoch's
            last partial batch is dropped so every step has the same shape.
        augment: `"imagenet"`, `"light"` (crop and flip), `"none"` (the
            evaluation resize and crop), or an `Augmentation`.
        seed: seeds shuffling and augmentation.
        cache: keep the decoded images in memory after the first epoch.
        deterministic: the same batches on every run with the same seed.
            Each example's augmentation is always a function of the seed,
            the epoch and its place in the epoch's shuffle; without this,
            parallel decoding and augmentation hand examples on as they
            finish, so batches may be made up differently.
        channels: 3 for RGB, 1 for grayscale (the augmented RGB image's gray).
        first_epoch: `None`: one epoch, another each time the dataset is
            iterated. A number: epochs from that one on, one after another
            without end, as `model.fit(..., initial_epoch=first_epoch,
            steps_per_epoch=...)` takes them.
    """
    check_channels(channels)
    height, width = image_size
    num_classes = len(split.class_names)
    policy = augment if isinstance(augment, Augmentation) else Augmentation.named(augment)
    if not (first_epoch is None or is_whole(first_epoch, 0)):
        raise DataError(f"first_epoch must be None or a whole number >= 0. "
                        f"Received: first_epoch={first_epoch!r}")
    steps = split.num_examples // global_batch_size
    if steps == 0:
        raise DataError(f"the training split has {split.num_examples} examples, fewer "
                        f"than one batch of {global_batch_size}; lower the batch size")
    # Shuffle file names, not decoded images: cheap and complete.
    from_files = split.paths is not None and not cache
    if from_files:
        source = tf.data.Dataset.from_tensor_slices((split.paths, split.labels))
        buffer = split.num_examples
    else:
        source = split.dataset.cache() if cache else split.dataset
        buffer = min(split.num_examples, 10_000)
    seed_key = tf.constant([seed, 0], tf.int64)

    def one_epoch(epoch):
        """Epoch `epoch`'s examples, each with its own stateless seed."""
        key = tf.random.experimental.stateless_fold_in(seed_key, epoch)
        # This function's own graph seed: with a global one of 0 (seed 0),
        # TensorFlow's seed check compares the tensor seed to 0 in Python.
        tf.random.set_seed(1)
        shuffled = source.shuffle(buffer, seed=tf.random.stateless_uniform(
            [], key, 0, 2**62, tf.int64))
        return shuffled.take(steps * global_batch_size).enumerate().map(
            lambda index, example: (example,
                                    tf.random.experimental.stateless_fold_in(key, index)))

    if first_epoch is None:
        numbers = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)
    else:
        numbers = tf.data.Dataset.range(first_epoch, 2**62)
    dataset = numbers.flat_map(one_epoch)
    if from_files:
        dataset = dataset.map(lambda example, key: (_decode_file(*example), key),
                              num_parallel_calls=tf.data.AUTOTUNE)

    if policy is None:
        dataset = dataset.map(
            lambda example, key: (center_crop(example[0], image_size),
                                  tf.one_hot(example[1], num_classes), key),
            num_parallel_calls=tf.data.AUTOTUNE)
    else:
        def crop_and_flip(example, key):
            image, label = example
            crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(key, 2))
            image = random_resized_crop(image, image_size, policy.crop_scale,
                                        policy.crop_ratio, crop_seed)
            if policy.flip:
                image = tf.image.stateless_random_flip_left_right(image, flip_seed)
            # Bicubic resizing overshoots [0, 255] at edges.
            return tf.clip_by_value(image, 0.0, 255.0), tf.one_hot(label, num_classes), key

        dataset = dataset.map(crop_and_flip, num_parallel_calls=tf.data.AUTOTUNE)
        distortions = [_rand_augment(policy.rand_augment_magnitude, seed)]
        if policy.random_erasing:
            distortions.append(keras.layers.RandomErasing(
                factor=policy.random_erasing, value_range=(0, 255), seed=seed, **CHANNELS_LAST))
        distortions = [layer for layer in distortions if layer is not None]
        if distortions:
            dataset = dataset.map(_distorter(distortions, (height, width, 3)),
                                  num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(global_batch_size, drop_remainder=True)
    if policy is not None and (policy.mixup_alpha or policy.cutmix_alpha):
        dataset = dataset.map(_mixer(policy, seed, global_batch_size, (height, width, 3),
                                     num_classes), num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.map(lambda images, labels, keys: (tf.ensure_shape(
        _with_channels(images, channels), [global_batch_size, height, width, channels]), labels))
    if first_epoch is None:
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(steps))
    return _finish(dataset, deterministic)


def evaluation_pipeline(split, image_size, global_batch_size, cache=False,
                        drop_remainder=False, channels=3):
    """Batches of the evaluation transform: shorter side to size / 0.9, center
    crop; RGB, or its gray for `channels=1`."""
    check_channels(channels)
    num_classes = len(split.class_names)
    dataset = split.dataset.map(
        lambda image, label: (center_crop(image, image_size),
                              tf.one_hot(label, num_classes)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    if cache:
        dataset = dataset.cache()
    dataset = dataset.batch(global_batch_size, drop_remainder=drop_remainder)
    if channels != 3:
        dataset = dataset.map(lambda images, labels: (_with_channels(images, channels), labels))
    return _finish(dataset, deterministic=True)


def check_channels(channels):
    """Refuses a channel count that image files are not read as (a `DataError`)."""
    check_file_channels(channels, DataError)


def _with_channels(images, channels):
    """A batch of RGB images `(..., 3)` as they are, or as their gray `(..., 1)`
    for `channels=1` (`keras_twins.images.grayscale`'s weights)."""
    if channels == 3:
        return images
    return tf.tensordot(images, tf.constant(LUMA, images.dtype), axes=1)[..., None]


def _finish(dataset, deterministic):
    options = tf.data.Options()
    options.deterministic = deterministic
    # Each worker reads every file and keeps its share of the examples, which
    # works for in-memory and generated sources as well as files.
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    # No autotuning thread: it sleeps up to 10 s between rounds, and deleting
    # an iterator (at the end of each epoch, evaluation or predict) waits for
    # it to wake. The parallel maps run on every core this process may use,
    # as far as the autotuner would take them on a CPU-bound pipeline.
    options.autotune.enabled = False
    options.autotune.initial_parallelism = cpu_streams.usable_cores()
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def center_crop(image, image_size, crop_pct=variants.CROP_PCT):
    """timm's evaluation transform in TensorFlow, as float32 in [0, 255].

    The same geometry as `keras_twins.load_image` (see there): a square size
    resizes the shorter side to `floor(size / crop_pct)`, a non-square one
    keeps the aspect ratio and fits the tighter side to `floor(H / crop_pct)`
    or `floor(W / crop_pct)`; then the center crop, its offset rounded as
    torchvision rounds it. Bicubic, antialiased when shrinking.
    """
    height, width = image_size
    shape = tf.cast(tf.shape(image)[:2], tf.float64)
    if height == width:
        # torchvision's Resize(int): int(target * long / short) for the longer side.
        target = math.floor(height / crop_pct)
        longer = tf.floor(target * tf.reduce_max(shape) / tf.reduce_min(shape))
        resized = tf.where(shape[0] < shape[1], tf.stack([target, longer]),
                           tf.stack([longer, target]))
    else:
        # timm's ResizeKeepRatio: the smaller of the two scale ratios, rounded sides.
        ratio = tf.minimum(shape[0] / math.floor(height / crop_pct),
                           shape[1] / math.floor(width / crop_pct))
        resized = tf.round(shape / ratio)
    resized = tf.cast(resized, tf.int32)
    image = tf.image.resize(image, resized, method="bicubic", antialias=True)
    # torchvision's CenterCrop offset, round((resized - size) / 2), halves to
    # even as Python's round and tf.round do.
    top, left = tf.unstack(tf.cast(tf.round(
        tf.cast(resized - [height, width], tf.float32) / 2), tf.int32))
    image = image[top:top + height, left:left + width]
    return tf.clip_by_value(tf.ensure_shape(image, [height, width, 3]), 0.0, 255.0)


def random_resized_crop(image, image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        seed=(0, 0)):
    """A crop of random area fraction `scale` and aspect `ratio`, resized bicubically.

    `seed` is a stateless seed, two integers: the same seed gives the same crop.
    Falls back to the whole image after 10 failed draws, as Inception did.
    """
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.zeros([1, 0, 4]), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale,
        max_attempts=10, use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, size)
    image = tf.image.resize(crop, image_size, method="bicubic", antialias=True)
    return tf.ensure_shape(image, [*image_size, 3])


def _rand_augment(magnitude, seed):
    """Keras' RandAugment, two operations per image, at timm's magnitude scale.

    Keras uses one strength for all operations; the geometric ones get timm's
    ranges for `magnitude` (rotation 30 degrees, shear 0.3, translation 0.45
    of the side, each times magnitude / 10) so that they do not turn images
    upside down.
    """
    if not magnitude:
        return None
    strength = magnitude / 10.0
    layer = keras.layers.RandAugment(value_range=(0, 255), num_ops=2, factor=strength,
                                     interpolation="bilinear", seed=seed, **CHANNELS_LAST)
    geometric = dict(
        random_rotation=keras.layers.RandomRotation(
            30.0 / 360.0 * strength, seed=seed, **CHANNELS_LAST),
        random_shear=keras.layers.RandomShear(
            0.3 * strength, 0.3 * strength, seed=seed, **CHANNELS_LAST),
        random_translation=keras.layers.RandomTranslation(
            0.45 * strength, 0.45 * strength, seed=seed, **CHANNELS_LAST),
    )
    for name, replacement in geometric.items():
        if name not in type(layer)._AUGMENT_LAYERS:
            raise RuntimeError(f"keras.layers.RandAugment has no '{name}' operation "
                               "in this Keras version")
        setattr(layer, name, replacement)
    return layer


def _mixer(policy, seed, batch_size, image_shape, num_classes):
    """MixUp or CutMix on each batch, one of them chosen per batch, from the
    batch's first example's seed."""
    mixup = cutmix = None
    if policy.mixup_alpha:
        mixup = keras.layers.MixUp(alpha=policy.mixup_alpha, seed=seed, **CHANNELS_LAST)
    if policy.cutmix_alpha:
        cutmix = keras.layers.CutMix(factor=policy.cutmix_alpha, seed=seed, **CHANNELS_LAST)
    seeded = _seeded_calls([mixup, cutmix], {"images": [batch_size, *image_shape],
                                             "labels": [batch_size, num_classes]})

    def mix(images, labels, keys):
        switch_key, layers_key = tf.unstack(tf.random.experimental.stateless_split(keys[0], 2))
        data = {"images": images, "labels": labels}
        if mixup is None or cutmix is None:
            mixed = seeded(layers_key, lambda: (mixup or cutmix)(data, training=True))
        else:
            use_cutmix = tf.random.stateless_uniform([], switch_key) < policy.mix_switch_prob
            mixed = seeded(layers_key, lambda: tf.cond(
                use_cutmix, lambda: cutmix(data, training=True),
                lambda: mixup(data, training=True)))
        # lam * 255 + (1 - lam) * 255 rounds to 255.00002 now and then.
        return tf.clip_by_value(mixed["images"], 0.0, 255.0), mixed["labels"], keys

    return mix


def _distorter(layers, image_shape):
    """Keras' augmentation `layers` in turn on each `(image, label, seed)`."""
    seeded = _seeded_calls(layers, image_shape)

    def distort(image, label, key):
        def call():
            distorted = image
            for layer in layers:
                distorted = layer(distorted, training=True)
            return distorted

        return tf.clip_by_value(seeded(key, call), 0.0, 255.0), label, key

    return distort


def _seeded_calls(layers, shapes):
    """`seeded(key, call)`: runs `call`, which calls Keras' augmentation
    `layers`, with their random numbers drawn from `key` alone.

    Keras' layers draw from seed generators, variables that each call
    advances: parallel calls drew in whatever order they ran, and what one
    example got depended on every call before it. In a `keras.StatelessScope`
    the generators' states are values from the key, and their updates are
    dropped: each call is a function of its example's key, in parallel.
    On a Keras backend other than TensorFlow, Keras makes the generators
    a layer uses in tf.data on its first call there; one is traced here, on
    zeros of `shapes` (a shape, or a dict of them as the layers take).
    """
    states = []
    for layer in layers:
        if layer is None:
            continue
        if keras.backend.backend() != "tensorflow":
            example = ({name: tf.zeros(shape) for name, shape in shapes.items()}
                       if isinstance(shapes, dict) else tf.zeros(shapes))
            tf.data.Dataset.from_tensors(example).map(lambda data: layer(data, training=True))
        for each in layer._flatten_layers():
            for generator in (*each._seed_generators,
                              *getattr(each, "_backend_generators", {}).values()):
                if (isinstance(getattr(generator.state, "value", None), tf.Variable)
                        and all(generator.state is not state for state in states)):
                    states.append(generator.state)

    def seeded(key, call):
        with keras.StatelessScope() as scope:
            for i, state in enumerate(states):
                scope.add_update((state, tf.cast(tf.random.stateless_uniform(
                    [2], tf.random.experimental.stateless_fold_in(key, i), 0, 2**31 - 1,
                    tf.int64), state.dtype)))
            result = call()
        if len(scope.state_mapping) != len(states):
            # Its draws would repeat for every example.
            raise RuntimeError("a Keras augmentation layer drew from a seed generator "
                               "that keras_twins.data does not seed")
        return result

    return seeded


def write_digits_folder(root, image_size=32, validation_fraction=0.2, seed=0):
    """Writes scikit-learn's bundled handwritten digits as an image folder.

    `root/train/0..9/*.png` and `root/validation/0..9/*.png`: the 1,797 8x8
    digits, upscaled to `image_size` (nearest neighbour) as 8-bit RGB, split
    per class. Needs scikit-learn, no network. Returns `root`.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        indices = rng.permutation(np.flatnonzero(digits.target == label))
        held_out = int(round(len(indices) * validation_fraction))
        for split, chosen in (("validation", indices[:held_out]),
                              ("train", indices[held_out:])):
            folder = os.path.join(root, split, str(label))
            os.makedirs(folder, exist_ok=True)
            for i in chosen:
                pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
                Image.fromarray(pixels).convert("RGB").resize(
                    (image_size, image_size), Image.NEAREST
                ).save(os.path.join(folder, f"{i:04d}.png"))
    return os.fspath(root)
