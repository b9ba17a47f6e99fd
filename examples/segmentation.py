"""Fine-tune a Semantic FPN on a Twins backbone for semantic segmentation.

    python examples/segmentation.py [--data tfds:oxford_iiit_pet | synthetic]
        [--model twins_svt_small] [--weights imagenet|PATH|none]
        [--image-size 256 320] [--epochs 10] [--steps-per-epoch N] [--batch-size 8]
        [--output build/segmentation]

With `tfds:oxford_iiit_pet` (downloaded by tensorflow-datasets on first use)
the classes are background and pet, and the trimap's border pixels are
ignored. `synthetic` needs no network: squares and disks made on the spot
(`keras_twins.segmentation.synthetic_shapes`). The backbone starts from
ImageNet weights; the head is new. Writes the model to OUTPUT/model.keras and
OUTPUT/predictions.png: image, ground truth and prediction side by side.
"""

import os
import sys

from weights_convert.console import quiet_library_chatter

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# TensorFlow's runtime writes notices to stderr as it loads and as it first
# runs, which TF_CPP_MIN_LOG_LEVEL does not silence: they would bury a
# one-line error. Python's sys.stderr still writes.
with quiet_library_chatter():
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_twins
    from keras_twins import segmentation
    from keras_twins.cli import ArgumentParser
    from keras_twins.files import STAGING_PREFIX
    from keras_twins.files import other_entries
    from keras_twins.training import save_model

# What the example writes into its folder; a later run replaces these.
OUTPUT_FILES = ("model.keras", "predictions.png")


def is_output_folder(path):
    """A folder holding only what this example writes (and an interrupted
    write's leftovers), or none yet: the only kind it writes into."""
    if not os.path.exists(path):
        return True
    return os.path.isdir(path) and not other_entries(
        path, OUTPUT_FILES, [STAGING_PREFIX, "predictions.png."])


PALETTE = np.array([[0, 0, 0], [230, 80, 40], [40, 110, 230], [240, 220, 60]], np.uint8)


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="tfds:oxford_iiit_pet")
    parser.add_argument("--model", default="twins_svt_small",
                        choices=sorted(keras_twins.CONSTRUCTORS))
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--image-size", type=int, nargs=2, default=[256, 320],
                        metavar=("H", "W"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps-per-epoch", type=int, default=None,
                        help="training batches per epoch (default: the whole training set)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--output", default=os.path.join("build", "segmentation"))
    args = parser.parse_args(argv)
    size = tuple(args.image_size)
    if args.steps_per_epoch is not None and args.steps_per_epoch < 1:
        parser.error(f"--steps-per-epoch must be at least 1. Received: {args.steps_per_epoch}")
    if not is_output_folder(args.output):
        # It may be a training run's, whose model.keras this would replace.
        sys.exit(f"error: {args.output} holds other files than this example's "
                 f"({', '.join(OUTPUT_FILES)}); choose another --output")

    try:
        train, validation, num_classes = _data(args.data, size, args.batch_size)
        backbone = keras_twins.CONSTRUCTORS[args.model](
            include_top=False, weights=None if args.weights == "none" else args.weights,
            input_shape=size + (3,), drop_path_rate=0.1)
    except (ValueError, OSError) as error:
        sys.exit(f"error: {' '.join(str(error).split())}")
    model = segmentation.SemanticFPN(backbone, num_classes)
    segmentation.compile_for_segmentation(
        model, keras.optimizers.AdamW(args.learning_rate, weight_decay=1e-4))
    model.fit(train.repeat() if args.steps_per_epoch else train, validation_data=validation,
              epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, verbose=2)

    os.makedirs(args.output, exist_ok=True)
    save_model(model, os.path.join(args.output, "model.keras"))
    images, masks = next(iter(validation.unbatch().batch(4)))
    predictions = model.predict(images, verbose=0).argmax(-1)
    picture = os.path.join(args.output, "predictions.png")
    _side_by_side(images.numpy(), masks.numpy(), predictions, picture)
    print(f"wrote {os.path.join(args.output, 'model.keras')} and {picture}")


def _data(source, size, batch_size):
    """(train, validation, num_classes): batched (image, mask) pipelines."""
    if source == "synthetic":
        images, masks = segmentation.synthetic_shapes(400, size)
        train = tf.data.Dataset.from_tensor_slices((images[:320], masks[:320]))
        validation = tf.data.Dataset.from_tensor_slices((images[320:], masks[320:]))
        return (train.shuffle(320).batch(batch_size, drop_remainder=True),
                validation.batch(batch_size), 3)
    if source != "tfds:oxford_iiit_pet":
        raise ValueError(f"--data must be tfds:oxford_iiit_pet or synthetic. Received: {source}")
    import tensorflow_datasets as tfds

    def prepare(example):
        image = tf.image.resize(example["image"], size, method="bilinear")
        trimap = tf.image.resize(example["segmentation_mask"], size, method="nearest")[..., 0]
        # trimap: 1 pet, 2 background, 3 border -> 1, 0, ignored
        mask = tf.gather(tf.constant([segmentation.IGNORE_LABEL, 1, 0,
                                      segmentation.IGNORE_LABEL], tf.uint8), trimap)
        return image, mask

    try:
        train, validation = tfds.load("oxford_iiit_pet", split=["train", "test"])
    except Exception as error:  # tfds raises download, checksum and format errors alike
        raise ValueError(f"tfds:oxford_iiit_pet could not be loaded: {error}") from None
    autotune = tf.data.AUTOTUNE
    train = (train.map(prepare, num_parallel_calls=autotune).shuffle(1000)
             .map(lambda image, mask: _flip(image, mask), num_parallel_calls=autotune)
             .batch(batch_size, drop_remainder=True).prefetch(autotune))
    validation = validation.map(prepare, num_parallel_calls=autotune).batch(batch_size)
    return train, validation.prefetch(autotune), 2


def _flip(image, mask):
    flip = tf.random.uniform(()) < 0.5
    image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
    mask = tf.cond(flip, lambda: tf.reverse(mask, [1]), lambda: mask)
    return image, mask


def _side_by_side(images, masks, predictions, path):
    """Rows of image | ground truth | prediction, written under a temporary name."""
    from PIL import Image

    def colour(labels):
        coloured = PALETTE[np.minimum(labels, len(PALETTE) - 1)]
        coloured[labels == segmentation.IGNORE_LABEL] = 255
        return coloured

    rows = [np.concatenate([np.clip(image, 0, 255).astype(np.uint8), colour(mask),
                            colour(prediction)], axis=1)
            for image, mask, prediction in zip(images, masks, predictions)]
    temporary = f"{path}.partial.png"
    Image.fromarray(np.concatenate(rows, axis=0)).save(temporary)
    os.replace(temporary, path)


if __name__ == "__main__":
    with quiet_library_chatter():
        main()
