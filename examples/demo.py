"""keras_twins demo: the six variants beside the paper, and a classification.

    python examples/demo.py [--checkpoint PATH] [IMAGE ...]

Builds each variant, prints its parameters and multiply-accumulates at 224
beside the published figures, and, given a converted `.weights.h5` or a
timm / official checkpoint, classifies images (by default the two sample
photos that scikit-learn ships). Needs no network.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import keras_twins  # noqa: E402
from keras_twins.cli import format_table  # noqa: E402
from keras_twins.flops import count_macs  # noqa: E402
from keras_twins.images import load_image  # noqa: E402


def variants_table():
    header = ("variant", "params", "paper params", "GMACs@224", "paper GFLOPs",
              "top-1 paper", "top-1 timm")
    rows = []
    for name, constructor in keras_twins.CONSTRUCTORS.items():
        entry = keras_twins.VARIANTS[name]
        model = constructor()
        rows.append((
            name,
            f"{model.count_params():,}",
            f"{entry['params']:,}",
            f"{count_macs(**entry['config']) / 1e9:.2f}",
            f"{entry['paper_gflops']:.1f}",
            f"{entry['paper_top1']:.1f}",
            f"{entry['timm_top1']:g}",
        ))
    return format_table(header, rows)


def classify(checkpoint, variant, images, top=5):
    from weights_convert import build_model_for
    from weights_convert import read_checkpoint

    try:
        if checkpoint.endswith(".weights.h5"):
            if variant not in keras_twins.CONSTRUCTORS:
                raise ValueError("a .weights.h5 file needs --variant, one of "
                                 + ", ".join(keras_twins.CONSTRUCTORS))
            model = keras_twins.CONSTRUCTORS[variant](weights=checkpoint)
        else:
            model = build_model_for(read_checkpoint(checkpoint), variant, checkpoint)
    except ValueError as error:
        sys.exit(f"error: {error}")
    batch = np.stack([load_image(path) for path in images])
    probabilities = model.predict(batch, verbose=0)
    print(f"\n{model.name} on {len(images)} image(s), top-{top} class ids:")
    for path, row in zip(images, probabilities):
        best = np.argsort(row)[::-1][:top]
        ranked = ", ".join(f"{i} ({row[i]:.3f})" for i in best)
        print(f"  {os.path.basename(path)}: {ranked}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a .weights.h5, .safetensors or .pth file")
    parser.add_argument("--variant", help="the variant of a .weights.h5 checkpoint")
    parser.add_argument("images", nargs="*", help="image files (default: sample photos)")
    args = parser.parse_args(argv)

    print("Twins variants (built here) beside the published figures\n")
    print(variants_table())
    if not args.checkpoint:
        print("\nGive a checkpoint to classify images: "
              "make demo CHECKPOINT=path/to/model.safetensors")
        return
    images = args.images
    if not images:
        import sklearn.datasets

        folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
        images = [os.path.join(folder, name) for name in ("china.jpg", "flower.jpg")]
    classify(args.checkpoint, args.variant, images)


if __name__ == "__main__":
    main()
