"""keras_twins demo: train, export and check a compact Twins-SVT, offline.

    python examples/demo.py [--output build/demo] [--epochs 8]

The whole mission on scikit-learn's bundled handwritten digits, with no
network: the digits are written as an image folder, a compact Twins-SVT
trains on them with `model.fit` through `keras_twins.training.train` (the
same pipeline as `keras-twins train`), and the model is exported to TFLite
float32, full-integer int8 (for integer-only accelerators) and int8-mixed
(the fastest on phone CPUs). Each is evaluated on the held-out digits and
timed at batch 1, in one table. The training curves
are in OUTPUT/run/training.png. About a minute on 2 CPU cores.
"""

import os
import shutil
import sys
import time

from weights_convert.console import quiet_library_chatter

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# TensorFlow's runtime writes notices to stderr as it loads and as it first
# runs, which TF_CPP_MIN_LOG_LEVEL does not silence: they would bury a
# one-line error. Python's sys.stderr still writes.
with quiet_library_chatter():
    import numpy as np
    import tensorflow as tf

    from keras_twins import data as data_lib
    from keras_twins.cli import ArgumentParser
    from keras_twins.cli import format_table
    from keras_twins.export import TFLiteClassifier
    from keras_twins.export import export
    from keras_twins.files import STAGING_PREFIX
    from keras_twins.files import other_entries
    from keras_twins.training import train

# A Twins-SVT of 0.5 M parameters: the SVT pattern (LSA and GSA blocks
# alternating, a PEG per stage) at a size that trains in a minute on a CPU.
COMPACT_SVT = dict(embed_dims=(32, 64, 96, 128), depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4),
                   mlp_ratios=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1), window_sizes=(7, 7, 7, 7))
IMAGE_SIZE = 32


# What a demo run writes into its folder, which the next run replaces.
DEMO_FILES = {"digits", "run", "labels.txt", "digits_float32.tflite", "digits_int8.tflite",
              "digits_int8_mixed.tflite"}


def is_demo_folder(path):
    """A folder holding only what a demo run writes (and an interrupted write's
    `.partial-*` folder): the only kind the demo deletes."""
    return os.path.isdir(path) and not os.path.islink(path) and not other_entries(
        path, DEMO_FILES, [STAGING_PREFIX])


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.path.join("build", "demo"),
                        help="the demo's folder, replaced on each run (default build/demo)")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1. Received: {args.epochs}")

    if os.path.exists(args.output) and not is_demo_folder(args.output):
        sys.exit(f"error: {args.output} exists and is not a demo folder; choose another "
                 "--output")
    shutil.rmtree(args.output, ignore_errors=True)
    digits = data_lib.write_digits_folder(os.path.join(args.output, "digits"), IMAGE_SIZE)
    run = os.path.join(args.output, "run")

    print(f"Training a compact Twins-SVT on scikit-learn's digits ({args.epochs} epochs)...",
          flush=True)
    started = time.perf_counter()
    # Deterministic: the same table on every run on one machine, at no cost here.
    result = train(digits, COMPACT_SVT, output=run, image_size=IMAGE_SIZE,
                   epochs=args.epochs, batch_size=32, augment="none", learning_rate=1e-3,
                   warmup_epochs=1, drop_path_rate=0.0, strategy="one_device", verbose=2,
                   deterministic=True)
    training_seconds = time.perf_counter() - started
    model = result.model

    validation = data_lib.load_split(digits, "validation")
    images, labels = [], []
    for batch_images, batch_labels in data_lib.evaluation_pipeline(
            validation, (IMAGE_SIZE, IMAGE_SIZE), 64):
        images.append(batch_images.numpy())
        labels.append(np.argmax(batch_labels.numpy(), axis=-1))
    images, labels = np.concatenate(images), np.concatenate(labels)

    names = result.class_names
    float32 = export(model, os.path.join(args.output, "digits_float32.tflite"), labels=names)
    int8 = export(model, os.path.join(args.output, "digits_int8.tflite"), quantize="int8",
                  representative_data=os.path.join(digits, "train"), labels=names)
    mixed = export(model, os.path.join(args.output, "digits_int8_mixed.tflite"),
                   quantize="int8-mixed", representative_data=os.path.join(digits, "train"),
                   labels=names)

    keras_predictions = np.argmax(model.predict(images, verbose=0), axis=-1)
    serve = tf.function(lambda x: model(x, training=False))  # as a SavedModel serves
    rows = [_row("Keras (TensorFlow)", keras_predictions, keras_predictions, labels,
                 _keras_file_size(run), _latency(serve, images))]
    for name, path in (("TFLite float32", float32), ("TFLite int8", int8),
                       ("TFLite int8-mixed", mixed)):
        run_one = TFLiteClassifier(path)  # LiteRT's interpreter
        predictions = np.array([np.argmax(run_one(image[None])) for image in images])
        rows.append(_row(name, predictions, keras_predictions, labels,
                         os.path.getsize(path), _latency(run_one, images)))

    print(f"\nCompact Twins-SVT ({model.count_params():,} parameters) trained in "
          f"{training_seconds:.0f} s; {len(labels)} held-out digits at "
          f"{IMAGE_SIZE}x{IMAGE_SIZE}\n")
    print(format_table(("model", "top-1", "agrees with Keras", "size (MB)",
                        "batch-1 latency (ms)"), rows))
    print(f"\ntraining curves: {os.path.join(run, 'training.png')}")
    print(f"files: {os.path.join(run, 'model.keras')}, {float32}, {int8}, {mixed}")


def _row(name, predictions, keras_predictions, labels, size, latency):
    return (name, f"{np.mean(predictions == labels):.2%}",
            f"{np.mean(predictions == keras_predictions):.2%}", f"{size / 1e6:.2f}",
            f"{latency * 1e3:.2f}")


def _keras_file_size(run):
    return os.path.getsize(os.path.join(run, "model.keras"))


def _latency(function, images, repeats=50):
    """Median seconds per single-image call, after a warm-up."""
    batch = images[:1]
    for _ in range(5):
        function(batch)
    times = []
    for i in range(repeats):
        image = images[i % len(images)][None]
        started = time.perf_counter()
        function(image)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


if __name__ == "__main__":
    with quiet_library_chatter():
        main()
