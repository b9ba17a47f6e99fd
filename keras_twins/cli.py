"""The `keras-twins` command: predict, convert, export, info.

    keras-twins predict IMAGE... [--model twins_svt_small] [--weights imagenet|PATH]
                                 [--top 5] [--json]
    keras-twins convert SRC --output DST.weights.h5 [--variant NAME]
    keras-twins export --format tflite|onnx|saved_model --output PATH [--model NAME|CONFIG.json]
                       [--weights imagenet|PATH|none] [--quantize none|float16|dynamic|int8]
                       [--representative-data DIR] [--image-size H [W]] [--batch-size 1] [--logits]
    keras-twins info
"""

import argparse
import contextlib
import json
import os
import sys

import numpy as np

from weights_convert.console import quiet_library_chatter


class CommandError(Exception):
    """Bad input from the command line; printed as one line, exit status 1."""


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="keras-twins", description="Twins vision transformers for Keras 3."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    predict = commands.add_parser("predict", help="classify image files")
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    predict.add_argument("--model", default="twins_svt_small",
                         help="variant name (default: twins_svt_small)")
    predict.add_argument("--weights", default="imagenet",
                         help="'imagenet' (default) or a checkpoint path")
    predict.add_argument("--top", type=int, default=5, help="classes per image")
    predict.add_argument("--json", action="store_true", help="print JSON")

    convert = commands.add_parser(
        "convert", help="convert a timm / official checkpoint to .weights.h5",
        add_help=False,
    )
    convert.add_argument("arguments", nargs=argparse.REMAINDER)

    export = commands.add_parser("export", help="export to TFLite, ONNX or SavedModel")
    export.add_argument("--model", default="twins_svt_small",
                        help="variant name, or a JSON file of keras_twins.Twins arguments")
    export.add_argument("--weights", default="imagenet",
                        help="'imagenet' (default), a checkpoint path, or 'none'")
    export.add_argument("--format", required=True, help="saved_model, tflite or onnx")
    export.add_argument("--output", required=True, help="the file (or SavedModel folder)")
    export.add_argument("--quantize", default="none",
                        help="TFLite: none, float16, dynamic or int8")
    export.add_argument("--representative-data", help="image folder for int8 calibration")
    export.add_argument("--image-size", type=int, nargs="+", default=[224],
                        metavar="H [W]", help="input size (default 224)")
    export.add_argument("--batch-size", type=int, default=1)
    export.add_argument("--logits", action="store_true",
                        help="output logits instead of probabilities")

    commands.add_parser("info", help="variants, sizes and cached weights")

    args = parser.parse_args(argv)
    if args.command == "convert":
        from weights_convert.__main__ import main as convert_main

        return convert_main(args.arguments)
    try:
        with quiet_library_chatter():
            if args.command == "predict":
                output = _predict(args)
            elif args.command == "export":
                output = _export(args)
            else:
                output = _info()
    except CommandError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(output)
    return 0


def _predict(args):
    from keras_twins.imagenet import imagenet_classes
    from keras_twins.images import load_image
    from keras_twins.pretrained import WeightsDownloadError

    if args.top < 1:
        raise CommandError(f"--top must be at least 1. Received: {args.top}")
    images = []
    for path in args.images:
        try:
            images.append(load_image(path))
        except (OSError, ValueError) as error:
            raise CommandError(f"{path}: cannot read the image ({_one_line(error)})") from None

    try:
        # Download progress goes to stderr, keeping stdout for the results.
        with contextlib.redirect_stdout(sys.stderr):
            model = _model(args.model, args.weights)
    except (ValueError, WeightsDownloadError) as error:
        raise CommandError(_one_line(error)) from None
    probabilities = model.predict(np.stack(images), verbose=0)

    classes = probabilities.shape[-1]
    names = [name for _, name in imagenet_classes()] if classes == 1000 else [
        f"class_{i}" for i in range(classes)]
    results = []
    for path, row in zip(args.images, probabilities):
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
        return json.dumps(results, indent=2)
    lines = []
    for result in results:
        lines.append(result["image"])
        for p in result["predictions"]:
            lines.append(f"  {p['rank']}. {p['label']:<32} {p['probability']:.4f}  "
                         f"(class {p['class_id']})")
    return "\n".join(lines)


def _model(model, weights):
    """The model named by `--model` with `--weights`, taking any input size.

    `model` is a variant name or a JSON file of `keras_twins.Twins` keyword
    arguments; a PyTorch checkpoint brings its own head size.
    """
    import keras_twins
    from weights_convert import build_model_for
    from weights_convert import read_checkpoint
    from weights_convert.checkpoint import PICKLE_SUFFIXES
    from weights_convert.checkpoint import SAFETENSORS_SUFFIX

    if weights not in ("imagenet", "none") and not os.path.isfile(weights):
        raise CommandError(f"{weights}: no such weights file")
    weights = None if weights == "none" else weights
    if model.endswith(".json"):
        try:
            with open(model) as f:
                config = json.load(f)
            return keras_twins.Twins(**config, weights=weights, input_shape=(None, None, 3))
        except (OSError, json.JSONDecodeError, TypeError) as error:
            raise CommandError(f"{model}: not a usable model configuration "
                               f"({_one_line(error)})") from None
    if model not in keras_twins.CONSTRUCTORS:
        raise CommandError(
            f"unknown model {model!r}; choose one of "
            f"{', '.join(keras_twins.CONSTRUCTORS)}, or give a CONFIG.json"
        )
    if weights is not None and weights.endswith((SAFETENSORS_SUFFIX,) + PICKLE_SUFFIXES):
        return build_model_for(read_checkpoint(weights), model, source=weights)
    return keras_twins.CONSTRUCTORS[model](weights=weights, input_shape=(None, None, 3))


def _export(args):
    from keras_twins.export import export
    from keras_twins.export import tflite_report
    from keras_twins.pretrained import WeightsDownloadError

    if len(args.image_size) > 2 or min(args.image_size) < 32:
        raise CommandError("--image-size takes H [W], each at least 32. "
                           f"Received: {' '.join(map(str, args.image_size))}")
    height, width = (args.image_size * 2)[:2]
    try:
        with contextlib.redirect_stdout(sys.stderr):
            model = _model(args.model, args.weights)
            path = export(model, args.output, format=args.format, quantize=args.quantize,
                          representative_data=args.representative_data,
                          image_size=(height, width), batch_size=args.batch_size,
                          output="logits" if args.logits else "probabilities")
    except (ValueError, WeightsDownloadError) as error:  # ExportError is a ValueError
        raise CommandError(_one_line(error)) from None
    lines = [f"wrote {path} ({args.format}, input {args.batch_size}x{height}x{width}x3 "
             "float32 RGB in [0, 255]) and labels.txt beside it"]
    if args.format == "tflite":
        report = tflite_report(path)
        lines += [
            f"size: {os.path.getsize(path) / 1e6:.1f} MB",
            f"ops: {', '.join(report['ops'])}",
            f"GPU delegate: {report['gpu_compatibility']}",
        ]
        if args.quantize == "int8":
            lines.append("ops computing in float: "
                         + (", ".join(report["float_ops"]) or "none"))
    return "\n".join(lines)


def _info():
    import keras_twins
    from keras_twins.flops import count_macs
    from keras_twins.pretrained import cache_dir
    from keras_twins.pretrained import cached_weights_path

    header = ("variant", "constructor", "params", "GMACs@224", "top-1", "ImageNet weights")
    rows = []
    for name, entry in keras_twins.VARIANTS.items():
        cached = os.path.exists(cached_weights_path(name))
        rows.append((
            name, keras_twins.CONSTRUCTORS[name].__name__, f"{entry['params']:,}",
            f"{count_macs(**entry['config']) / 1e9:.2f}", f"{entry['timm_top1']:g}",
            "cached" if cached else "not downloaded",
        ))
    return (
        f"keras_twins {keras_twins.__version__}\n\n" + format_table(header, rows)
        + f"\n\nweights cache: {cache_dir()}"
    )


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
