"""The `keras-twins` command: predict, convert, info.

    keras-twins predict IMAGE... [--model twins_svt_small] [--weights imagenet|PATH]
                                 [--top 5] [--json]
    keras-twins convert SRC --output DST.weights.h5 [--variant NAME]
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

    commands.add_parser("info", help="variants, sizes and cached weights")

    args = parser.parse_args(argv)
    if args.command == "convert":
        from weights_convert.__main__ import main as convert_main

        return convert_main(args.arguments)
    try:
        with quiet_library_chatter():
            if args.command == "predict":
                output = _predict(args)
            else:
                output = _info()
    except CommandError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(output)
    return 0


def _predict(args):
    import keras_twins
    from keras_twins.imagenet import imagenet_classes
    from keras_twins.images import load_image
    from keras_twins.pretrained import WeightsDownloadError

    if args.model not in keras_twins.CONSTRUCTORS:
        raise CommandError(
            f"unknown model {args.model!r}; choose one of "
            f"{', '.join(keras_twins.CONSTRUCTORS)}"
        )
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


def _model(variant, weights):
    """The variant with `weights`; a PyTorch checkpoint brings its own head size."""
    import keras_twins
    from weights_convert import build_model_for
    from weights_convert import read_checkpoint
    from weights_convert.checkpoint import PICKLE_SUFFIXES
    from weights_convert.checkpoint import SAFETENSORS_SUFFIX

    if weights != "imagenet" and not os.path.isfile(weights):
        raise CommandError(f"{weights}: no such weights file")
    if weights.endswith((SAFETENSORS_SUFFIX,) + PICKLE_SUFFIXES):
        return build_model_for(read_checkpoint(weights), variant, source=weights)
    return keras_twins.CONSTRUCTORS[variant](weights=weights)


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
