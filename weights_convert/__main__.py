"""Command line: python -m weights_convert SRC --output DST.weights.h5 [--variant NAME]."""

import sys

from weights_convert.console import ArgumentParser
from weights_convert.console import printable


def main(argv=None, prog="python -m weights_convert"):
    parser = ArgumentParser(
        prog=prog,
        description="Convert a timm or official Twins checkpoint (.safetensors, "
        ".pth, .pt, .bin) into a keras_twins .weights.h5 file.",
    )
    parser.add_argument("source", help="the PyTorch checkpoint")
    parser.add_argument("--output", "-o", required=True,
                        help="the Keras weights file to write (.weights.h5)")
    parser.add_argument("--variant", help="e.g. twins_svt_small; detected "
                        "from the tensor shapes when absent")
    args = parser.parse_args(argv)

    from weights_convert.console import quiet_library_chatter
    from weights_convert.errors import ConversionError

    try:
        with quiet_library_chatter():
            from weights_convert.convert import convert

            model = convert(args.source, args.output, variant=args.variant)
    except ConversionError as error:
        print(printable(f"error: {error}", sys.stderr), file=sys.stderr)
        return 1
    names = [layer.name for layer in model.layers]
    head = model.get_layer("head").units if "head" in names else None
    print(printable(
        f"{args.source} -> {args.output}: {model.name}, "
        f"{model.count_params():,} parameters, "
        + (f"{head} classes" if head else "no head")
        # the per-stage norms of a detection or segmentation backbone
        + (", pyramid norms (load with pyramid_norm=True)" if "pyramid_norm_0" in names else "")
        # a model trained on other than RGB images (timm's in_chans)
        + (f", {channels}-channel images (load with input_shape=(H, W, {channels}))"
           if (channels := model.input_shape[-1]) != 3 else ""), sys.stdout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
