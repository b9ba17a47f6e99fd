"""The `keras-twins` command: predict, convert, export, train, evaluate, info.

    keras-twins predict IMAGE... [--model twins_svt_small|MODEL.keras|FILE.tflite]
                                 [--weights imagenet|PATH]
                                 [--top 5] [--json]
    keras-twins convert SRC --output DST.weights.h5 [--variant NAME]
    keras-twins export --format tflite|onnx|saved_model --output PATH [--model NAME|CONFIG.json]
                       [--weights imagenet|PATH|none]
                       [--quantize none|float16|dynamic|int8|int8-mixed]
                       [--representative-data DIR] [--image-size H [W]]
                       [--batch-size 1|any] [--logits]
    keras-twins train --data tfds:NAME|DIR --output DIR [--model NAME|CONFIG.json]
                      [--weights imagenet|PATH] [--image-size H [W]] [--channels 3|1]
                      [--epochs N]
                      [--batch-size B] [--augment imagenet|light|none] [--strategy ...]
                      [--backup-dir DIR] [--resume] ...  (--help lists them all)
    keras-twins evaluate --data tfds:NAME|DIR --model-file DIR/model.keras|FILE.tflite
                         [--split NAME]
    keras-twins info
"""

import argparse
import contextlib
import json
import os
import sys
import warnings

import numpy as np

from weights_convert.console import ArgumentParser
from weights_convert.console import printable
from weights_convert.console import quiet_library_chatter


class CommandError(Exception):
    """Bad input from the command line; printed as one line, exit status 1.

    `output`: what the command did compute, printed to stdout before the error.
    """

    def __init__(self, message, output=None):
        super().__init__(message)
        self.output = output


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert"]:
        # The converter parses its own arguments: argparse's REMAINDER would
        # not pass it a leading --help or -h.
        from weights_convert.__main__ import main as convert_main

        return convert_main(argv[1:], prog="keras-twins convert")
    parser = ArgumentParser(
        prog="keras-twins", description="Twins vision transformers for Keras 3."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    predict = commands.add_parser("predict", help="classify image files")
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    predict.add_argument("--model", default="twins_svt_small",
                         help="variant name (default: twins_svt_small), a JSON file of "
                              "keras_twins.Twins arguments, a .keras model (from train) or a "
                              ".tflite file (from export, run by LiteRT)")
    predict.add_argument("--weights",
                         help="'imagenet' (default) or a checkpoint path; not for a .keras or "
                              ".tflite model")
    predict.add_argument("--top", type=int, default=5, help="classes per image")
    predict.add_argument("--json", action="store_true", help="print JSON")

    # Listed for --help; main() hands `convert ...` to the converter first.
    commands.add_parser("convert", help="convert a timm / official checkpoint to .weights.h5")

    export = commands.add_parser("export", help="export to TFLite, ONNX or SavedModel")
    export.add_argument("--model", default="twins_svt_small",
                        help="variant name, a JSON file of keras_twins.Twins arguments, "
                             "or a .keras model (from train)")
    export.add_argument("--weights",
                        help="'imagenet' (default), a checkpoint path, or 'none'; "
                             "not for a .keras model")
    export.add_argument("--format", required=True, help="saved_model, tflite or onnx")
    export.add_argument("--output", "-o", required=True, help="the file (or SavedModel folder)")
    export.add_argument("--quantize", default="none",
                        help="TFLite: none, float16, dynamic, int8 or int8-mixed")
    export.add_argument("--representative-data", help="image folder for int8 calibration")
    export.add_argument("--image-size", type=int, nargs="+", metavar="SIDE",
                        help="H, or H W: the input size (default: the .keras model's, "
                             "else 224)")
    export.add_argument("--batch-size", type=_batch_size, default=1,
                        help="the fixed batch, or 'any' (saved_model and onnx: a dynamic "
                             "batch axis)")
    export.add_argument("--logits", action="store_true",
                        help="output logits instead of probabilities")

    train = commands.add_parser("train", help="train or fine-tune with model.fit")
    train.add_argument("--data", required=True,
                       help="tfds:NAME or an image folder ROOT/SPLIT/LABEL/*.jpg|png|webp")
    train.add_argument("--output", "-o", required=True, help="the run folder")
    train.add_argument("--model", default="twins_svt_small",
                       help="variant name, or a JSON file of keras_twins.Twins arguments")
    train.add_argument("--weights", default="none",
                       help="'none' (default), 'imagenet' or a checkpoint path")
    train.add_argument("--image-size", type=int, nargs="+", default=[224], metavar="SIDE",
                       help="H, or H W (default: 224)")
    train.add_argument("--channels", type=int, choices=(3, 1), default=3,
                       help="3: RGB (default); 1: grayscale, RGB weights adapted")
    train.add_argument("--epochs", type=int, default=300)
    train.add_argument("--batch-size", type=int, default=128, help="per replica")
    train.add_argument("--augment", default="imagenet", help="imagenet, light or none")
    train.add_argument("--learning-rate", type=float,
                       help="peak rate (default 1e-3 x global batch / 1024)")
    train.add_argument("--weight-decay", type=float, default=0.05)
    train.add_argument("--warmup-epochs", type=float, default=5)
    train.add_argument("--drop-path-rate", type=float,
                       help="default 0.2 / 0.3 / 0.5 for small / base / large, else 0.1")
    train.add_argument("--label-smoothing", type=float, default=0.1)
    train.add_argument("--strategy", default="auto",
                       help="auto, one_device, mirrored, multi_worker or tpu")
    train.add_argument("--tpu", help="TPU name or address (--strategy tpu)")
    train.add_argument("--jit-compile", action="store_true",
                       help="compile steps with XLA (on JAX, they are by default)")
    train.add_argument("--cpu-streams", action="store_true",
                       help="CPU only: run each batch as one slice per core (faster)")
    train.add_argument("--mixed-precision", default="none", help="none, float16 or bfloat16")
    train.add_argument("--backup-dir", help="BackupAndRestore folder (default OUTPUT/backup)")
    train.add_argument("--backup-freq", default="epoch", help="'epoch' or a number of steps")
    train.add_argument("--resume", action="store_true",
                       help="continue the run already in --output")
    train.add_argument("--train-split", default="train",
                       help="split name (default train), or a slice: 'train[:90%%]'")
    train.add_argument("--validation-split", default="auto",
                       help="split name or slice ('train[90%%:]'), 'auto' (validation, "
                            "val or test) or 'none'")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--cache", action="store_true", help="keep decoded images in memory")
    train.add_argument("--deterministic", action="store_true",
                       help="the same batches on every run with the same --seed, so "
                            "the same weights")
    train.add_argument("--data-dir", help="tensorflow-datasets data folder")
    train.add_argument("--manual-dir", help="tensorflow-datasets manual download folder")

    evaluate = commands.add_parser("evaluate", help="loss, top-1 and top-5 on a split")
    evaluate.add_argument("--data", required=True, help="tfds:NAME or an image folder")
    evaluate.add_argument("--model-file", required=True,
                          help="a model.keras file, or a .tflite file from export (run by "
                               "LiteRT)")
    evaluate.add_argument("--split", default="auto",
                          help="split name or slice ('train[90%%:]'), or 'auto': the split "
                               "the model's run validated on, else validation, val or test, "
                               "else train")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--data-dir", help="tensorflow-datasets data folder")
    evaluate.add_argument("--json", action="store_true", help="print JSON")
    evaluate.add_argument("--cpu-streams", action="store_true",
                          help="CPU only: run each batch as one slice per core (faster)")

    commands.add_parser("info", help="variants, sizes and cached weights")

    args = parser.parse_args(argv)
    try:
        with quiet_library_chatter():
            if args.command == "predict":
                output = _predict(args)
            elif args.command == "export":
                output = _export(args)
            elif args.command == "train":
                output = _train(args)
            elif args.command == "evaluate":
                output = _evaluate(args)
            else:
                output = _info()
    except CommandError as error:
        if error.output:
            print(printable(error.output, sys.stdout))
        print(printable(f"error: {error}", sys.stderr), file=sys.stderr)
        return 1
    print(printable(output, sys.stdout))
    return 0


def _predict(args):
    from keras_twins.export import is_tflite_file
    from keras_twins.weights import WEIGHTS_SUFFIXES

    if args.top < 1:
        raise CommandError(f"--top must be at least 1. Received: {args.top}")
    for path in args.images:
        if os.path.isdir(path):
            raise CommandError(f"{path}: a folder, not an image file; give the images in it, "
                               f"as {os.path.join(path, '*.jpg')}")
        if not os.path.isfile(path):
            raise CommandError(f"{path}: no such image file")
        # `predict run/model.keras cat.jpg` fetched the default model first.
        if _is_keras_file(path) or path.lower().endswith((".json", ".tflite")):
            raise CommandError(f"{path}: a model, not an image; give it with --model")
        if path.lower().endswith(WEIGHTS_SUFFIXES):
            raise CommandError(f"{path}: a weights file, not an image; give it with --weights")
    if is_tflite_file(args.model):
        run, size, channels, outputs, names = _tflite_classifier(args.model, args.weights)
    else:
        run, size, channels, outputs, names = _keras_classifier(args.model, args.weights)
    results, unreadable = [], []
    for path, row in _predicted(run, channels, args.images, size, unreadable):
        if outputs == "logits":  # a head without softmax (classifier_activation=None)
            row = np.exp(row - row.max())
            row /= row.sum()
        best = row.argsort()[::-1][: args.top]
        results.append({
            "image": path,
            "predictions": [
                {"rank": rank, "class_id": int(i), "label": names[i],
                 "probability": float(row[i])}
                for rank, i in enumerate(best, start=1)
            ],
        })
    if args.json:
        output = json.dumps(results, indent=2)
    else:
        lines = []
        for result in results:
            lines.append(result["image"])
            for p in result["predictions"]:
                lines.append(f"  {p['rank']}. {p['label']:<32} {p['probability']:.4f}  "
                             f"(class {p['class_id']})")
        output = "\n".join(lines)
    if unreadable:
        # The other images are classified: one damaged photo in a folder of
        # thousands ended the command, when found, with nothing printed.
        raise CommandError(_unreadable_images(unreadable, len(args.images)),
                           output=output if results else None)
    return output


def _unreadable_images(unreadable, total):
    """One line for the images that could not be read: the first in full, then names."""
    line = unreadable[0][1]
    others = [path for path, _ in unreadable[1:]]
    if others:
        names = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        line = (f"{len(unreadable)} of {total} images could not be read, and were left out: "
                f"{line}; also {names}")
    return line


def _keras_classifier(model, weights):
    """`(run, size, channels, outputs, names)` of the Keras model `--model`
    names: `run(pixels)` its outputs for a batch of pixels in [0, 255]."""
    import keras

    from keras_twins import variants
    from keras_twins.export import LabelsWarning
    from keras_twins.export import class_names
    from keras_twins.model import classifier_outputs
    from keras_twins.model import image_input_problem
    from keras_twins.model import normalized
    from keras_twins.model import takes_pixels
    from keras_twins.pretrained import WeightsDownloadError

    try:
        # Download progress goes to stderr, keeping stdout for the results.
        with contextlib.redirect_stdout(sys.stderr):
            classifier = _model(model, weights)
    except (ValueError, WeightsDownloadError) as error:
        raise CommandError(_one_line(error)) from None
    if problem := image_input_problem(classifier):  # a checkpoint of a 1-channel model, say
        raise CommandError(f"{model}: {problem}")
    outputs = classifier_outputs(classifier)
    if outputs is None:
        raise CommandError(f"{model}: not an image classifier (its output has shape "
                           f"{classifier.output_shape}, not (batch, classes))")
    # A model trained at another size (a .keras file) gets its own size.
    size = tuple(classifier.input_shape[1:3])
    size = variants.DEFAULT_IMAGE_SIZE if None in size else size
    with _warnings_shown(LabelsWarning):
        names = class_names(classifier, model if _is_keras_file(model) else None)
    normalize = not takes_pixels(classifier)  # a Twins built with include_preprocessing=False

    def run(images):
        if normalize:
            images = keras.ops.convert_to_numpy(normalized(images))
        return classifier.predict(images, batch_size=len(images), verbose=0)

    return run, size, classifier.input_shape[-1], outputs, names


def _tflite_classifier(model, weights):
    """`_keras_classifier`'s for a TFLite file from `export`, run by LiteRT."""
    from keras_twins.export import TFLiteClassifier
    from keras_twins.export import default_class_names

    if weights is not None:
        raise CommandError(f"--weights does not apply to {model}: a TFLite file holds its own "
                           "weights")
    if os.path.isdir(model):
        raise CommandError(f"{model}: a folder, not a TFLite file")
    if not os.path.isfile(model):
        raise CommandError(f"{model}: no such model file")
    try:
        classifier = TFLiteClassifier(model)
    except ValueError as error:
        raise CommandError(_one_line(error)) from None
    names = classifier.labels or default_class_names(classifier.classes)
    return classifier, classifier.image_size, classifier.channels, classifier.output, names


def _predicted(run, channels, paths, size, unreadable, chunk=32):
    """`(path, outputs)` for each image, loading `chunk` images at a time.

    All at once, a shell glob of 10,000 photos took 6 GB of decoded pixels.
    An image that cannot be read is left out, and `(path, one-line reason)`
    appended to `unreadable`.
    """
    from keras_twins.images import load_image

    for start in range(0, len(paths), chunk):
        images, read = [], []
        for path in paths[start:start + chunk]:
            try:
                images.append(load_image(path, size, channels=channels))
                read.append(path)
            except (OSError, ValueError) as error:
                # Pillow's message names the file too, by its repr: once is enough.
                reason = _one_line(error).replace(f"{path}: ", "").replace(f" {path!r}", "")
                unreadable.append((path, f"{path}: cannot read the image ({reason})"))
        if images:
            yield from zip(read, run(np.stack(images)))


def _is_keras_file(model):
    return model.lower().endswith(".keras")


def _model(model, weights, any_channels=False):
    """The model named by `--model` with `--weights`, taking any input size.

    `model` is a variant name or a JSON file of `keras_twins.Twins` keyword
    arguments; a PyTorch checkpoint brings its own head size. A `.keras`
    file (from `keras-twins train`) is loaded as it is, with its own size.
    """
    import keras_twins
    from keras_twins.weights import WEIGHTS_SUFFIXES
    from weights_convert import build_model_for
    from weights_convert import read_checkpoint
    from weights_convert.checkpoint import PICKLE_SUFFIXES
    from weights_convert.checkpoint import SAFETENSORS_SUFFIX

    if _is_keras_file(model):
        from keras_twins.training import load_keras_model

        if weights is not None:
            raise CommandError(f"--weights does not apply to {model}: a .keras model "
                               "holds its own weights")
        if not os.path.isfile(model):
            raise CommandError(f"{model}: no such model file")
        return load_keras_model(model, any_channels)
    weights = "imagenet" if weights is None else weights
    if weights not in ("imagenet", "none") and not os.path.isfile(weights):
        raise CommandError(f"{weights}: no such weights file")
    weights = None if weights == "none" else weights
    if model.endswith(".json"):
        config = _read_config(model)
        for key, instead in (("weights", "give them with --weights"),
                             ("input_shape", "the command takes any size"),
                             ("input_tensor", "the command takes any size")):
            if key in config:
                raise CommandError(f"{model}: sets {key}, which the command sets itself "
                                   f"({instead}); leave {key} out of it")
        try:
            return keras_twins.Twins(**config, weights=weights, input_shape=(None, None, 3))
        except TypeError as error:  # say, a required argument missing from the file
            raise CommandError(f"{model}: not a usable model configuration "
                               f"({_one_line(error)})") from None
    if model not in keras_twins.CONSTRUCTORS:
        if model.endswith(WEIGHTS_SUFFIXES):
            raise CommandError(f"{model}: a weights file; give it with --weights, and its "
                               "variant or CONFIG.json with --model")
        if os.path.exists(model):
            raise CommandError(f"{model}: not a model the command reads; --model takes a variant "
                               "name, a CONFIG.json or a .keras model (an exported file runs in "
                               "LiteRT, onnxruntime or TensorFlow Serving)")
        raise CommandError(f"unknown model {model!r}; choose one of "
                           f"{', '.join(keras_twins.CONSTRUCTORS)}, a CONFIG.json or a .keras "
                           "model")
    if weights is not None and weights.endswith((SAFETENSORS_SUFFIX,) + PICKLE_SUFFIXES):
        return build_model_for(read_checkpoint(weights), model, source=weights)
    return keras_twins.CONSTRUCTORS[model](weights=weights, input_shape=(None, None, 3))


def _export(args):
    from keras_twins.export import LabelsWarning
    from keras_twins.export import SkippedImagesWarning
    from keras_twins.export import class_names
    from keras_twins.export import export
    from keras_twins.export import export_size
    from keras_twins.export import input_color
    from keras_twins.export import tflite_report
    from keras_twins.pretrained import WeightsDownloadError

    image_size = args.image_size
    if image_size is not None:
        if len(image_size) > 2:  # the smallest size is the model's, which `export` checks
            raise CommandError("--image-size takes H or H W. "
                               f"Received: {' '.join(map(str, image_size))}")
        image_size = tuple((image_size * 2)[:2])
    try:
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SkippedImagesWarning)
            model = _model(args.model, args.weights, any_channels=True)
            with _warnings_shown(LabelsWarning):
                labels = class_names(model, args.model if _is_keras_file(args.model) else None)
            path = export(model, args.output, format=args.format, quantize=args.quantize,
                          representative_data=args.representative_data,
                          image_size=image_size, batch_size=args.batch_size,
                          output="logits" if args.logits else "probabilities",
                          labels=labels)
    except (ValueError, WeightsDownloadError) as error:  # ExportError is a ValueError
        raise CommandError(_one_line(error)) from None
    height, width = export_size(model, image_size)
    batch = "N" if args.batch_size is None else args.batch_size
    channels = model.input_shape[-1]
    lines = [f"wrote {path} ({args.format}, input {batch}x{height}x{width}x{channels} "
             f"float32 {input_color(channels)} in [0, 255]) and labels.txt beside it"]
    lines += [str(w.message) for w in caught if issubclass(w.category, SkippedImagesWarning)]
    if args.format == "tflite":
        report = tflite_report(path)
        lines += [
            f"size: {os.path.getsize(path) / 1e6:.1f} MB",
            f"ops: {', '.join(report['ops'])}",
            f"GPU delegate: {report['gpu_compatibility']}",
        ]
        if args.quantize.startswith("int8"):
            lines.append("ops computing in float: "
                         + (", ".join(report["float_ops"]) or "none"))
    return "\n".join(lines)


def _batch_size(text):
    """`--batch-size` of export: a number, or 'any' for a dynamic batch axis (None)."""
    if text == "any":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a number or 'any'. Received: {text}") from None


def _start_cpu_streams(args):
    """The number of CPU streams, 0 without --cpu-streams."""
    if not args.cpu_streams:
        return 0
    from keras_twins.cpu_streams import use_cpu_streams

    try:
        return use_cpu_streams()
    except (ValueError, RuntimeError) as error:
        raise CommandError(_one_line(error)) from None


def _read_config(path):
    """The `keras_twins.Twins` arguments in a JSON file; a bad file is one line.

    A binary file was a UnicodeDecodeError traceback, and a list a TypeError
    about `**`.
    """
    import inspect

    import keras_twins

    try:
        with open(path, encoding="utf-8-sig") as f:  # Notepad's byte-order mark or none
            config = json.load(f)
    except (OSError, ValueError) as error:  # ValueError: not JSON, or not UTF-8
        raise CommandError(f"{path}: not a usable model configuration "
                           f"({_one_line(error)})") from None
    if not isinstance(config, dict):
        raise CommandError(f"{path}: must hold a JSON object of keras_twins.Twins arguments")
    unknown = sorted(set(config) - set(inspect.signature(keras_twins.Twins).parameters))
    if unknown:
        raise CommandError(f"{path}: not a usable model configuration (keras_twins.Twins "
                           f"takes no argument {', '.join(map(repr, unknown))})")
    return config


def _train(args):
    from keras_twins.pretrained import WeightsDownloadError
    from keras_twins.training import TrainingWarning
    from keras_twins.training import train

    streams = _start_cpu_streams(args)
    model = _read_config(args.model) if args.model.endswith(".json") else args.model
    if args.weights not in ("none", "imagenet") and not os.path.isfile(args.weights):
        raise CommandError(f"{args.weights}: no such weights file")
    backup_freq = args.backup_freq
    if backup_freq != "epoch":
        if not backup_freq.isdigit() or int(backup_freq) < 1:
            raise CommandError(f"--backup-freq takes 'epoch' or a number of steps. "
                               f"Received: {backup_freq}")
        backup_freq = int(backup_freq)
    try:
        with _progress_to_terminal(), _warnings_shown(TrainingWarning):
            result = train(
                args.data, model, output=args.output, image_size=args.image_size,
                epochs=args.epochs, batch_size=args.batch_size,
                weights=None if args.weights == "none" else args.weights,
                augment=args.augment, learning_rate=args.learning_rate,
                weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                drop_path_rate=args.drop_path_rate, label_smoothing=args.label_smoothing,
                strategy=args.strategy, tpu=args.tpu, jit_compile=args.jit_compile or "auto",
                mixed_precision=args.mixed_precision, backup_dir=args.backup_dir,
                backup_freq=backup_freq, resume=args.resume, seed=args.seed,
                cache=args.cache, deterministic=args.deterministic,
                train_split=args.train_split,
                validation_split=None if args.validation_split == "none"
                else args.validation_split,
                data_dir=args.data_dir, manual_dir=args.manual_dir, channels=args.channels)
    except (ValueError, WeightsDownloadError) as error:  # TrainingError, DataError
        raise CommandError(_one_line(error)) from None
    history = result.history
    lines = [f"trained {len(history.get('loss', []))} epoch(s) into {result.output}"
             + (f", each batch as {streams} CPU streams" if streams else "")]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "val_top5"):
        if history.get(key):
            lines.append(f"  {key}: {history[key][-1]:.4f}")
    if result.skipped_files:
        lines.append(f"skipped {len(result.skipped_files)} unreadable image file(s): "
                     + ", ".join(result.skipped_files[:5]))
    lines.append(f"model: {os.path.join(result.output, 'model.keras')}; curves: "
                 f"{os.path.join(result.output, 'training.png')}")
    return "\n".join(lines)


def _evaluate(args):
    from keras_twins.data import VALIDATION_SPLITS
    from keras_twins.export import LabelsWarning
    from keras_twins.training import evaluate

    _start_cpu_streams(args)
    try:
        with _progress_to_terminal(), _warnings_shown(LabelsWarning):
            results = evaluate(args.data, args.model_file, split=args.split,
                               batch_size=args.batch_size, data_dir=args.data_dir)
    except ValueError as error:
        raise CommandError(_one_line(error)) from None
    if args.json:
        return json.dumps(results, indent=2)
    split = f"the {results['split']} split"
    if args.split == "auto" and results["split"] == "train":
        split += f" ({args.data} has no {' or '.join(VALIDATION_SPLITS)} split)"
    lines = [f"{results['examples']} examples of {split}: loss {results['loss']:.4f}, "
             f"top-1 {results['accuracy']:.4f}, top-5 {results['top5']:.4f}"]
    if results["skipped"]:
        lines.append(f"skipped {len(results['skipped'])} unreadable image file(s): "
                     + ", ".join(results["skipped"][:5]))
    return "\n".join(lines)


@contextlib.contextmanager
def _warnings_shown(*categories):
    """Warnings of these categories as `warning: ...` lines on stderr, the
    command's others staying silenced (`quiet_library_chatter`)."""
    with warnings.catch_warnings(record=True) as caught:
        for category in categories:
            warnings.simplefilter("always", category)
        try:
            yield
        finally:
            for warning in caught:
                if issubclass(warning.category, categories):
                    print(printable(f"warning: {warning.message}", sys.stderr), file=sys.stderr)


@contextlib.contextmanager
def _progress_to_terminal():
    """Keras' progress bar on stderr, keeping stdout for the results."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _info():
    import keras_twins
    from keras_twins.flops import count_macs
    from keras_twins.pretrained import cache_dir
    from keras_twins.pretrained import cached_weights_path

    header = ("variant", "constructor", "params", "GMACs@224", "top-1", "ImageNet weights")
    rows = []
    for name, entry in keras_twins.VARIANTS.items():
        rows.append((
            name, keras_twins.CONSTRUCTORS[name].__name__, f"{entry['params']:,}",
            f"{count_macs(**entry['config']) / 1e9:.2f}", f"{entry['timm_top1']:g}",
            _cache_state(entry["config"], cached_weights_path(name)),
        ))
    return (
        f"keras_twins {keras_twins.__version__}\n\n" + format_table(header, rows)
        + f"\n\nweights cache: {cache_dir()}"
    )


def _cache_state(config, path):
    """"cached", "not downloaded", or "damaged" for an entry that does not
    hold the variant's weights (a copy cut short), which the next use of
    the weights fetches again."""
    from keras_twins.weights import architecture_in_weights_file
    from keras_twins.weights import architecture_of_config

    if not os.path.exists(path):
        return "not downloaded"
    if architecture_in_weights_file(path) == architecture_of_config(config):
        return "cached"
    return "damaged (fetched again when used)"


def format_table(header, rows):
    """Left-aligned plain-text columns."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(header), line("-" * w for w in widths), *map(line, rows)])


def _one_line(error):
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
