"""Export a Twins model to TFLite (float32, float16, int8) and run each file in LiteRT.

    python examples/export_tflite.py [--model twins_svt_small] [--weights imagenet|PATH|none]
                                     [--output-dir exported] [IMAGE ...]

Writes the three files with `labels.txt`, then classifies the images (by
default scikit-learn's two sample photos) with each file and with the Keras
model, and prints the top-1 agreement, the largest probability difference,
the file sizes and the GPU-delegate verdict.
"""

import os
import sys
import tempfile

from weights_convert.console import quiet_library_chatter

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# TensorFlow's runtime writes notices to stderr as it loads and as it first
# runs, which TF_CPP_MIN_LOG_LEVEL does not silence: they would bury a
# one-line error. Python's sys.stderr still writes.
with quiet_library_chatter():
    import numpy as np

    import keras_twins
    from keras_twins.cli import ArgumentParser
    from keras_twins.export import TFLiteClassifier
    from keras_twins.export import export
    from keras_twins.export import tflite_report


def main():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="twins_svt_small",
                        choices=sorted(keras_twins.CONSTRUCTORS))
    parser.add_argument("--weights", default="imagenet", help="imagenet, a path, or none")
    parser.add_argument("--output-dir", default="exported")
    parser.add_argument("images", nargs="*")
    args = parser.parse_args()

    weights = None if args.weights == "none" else args.weights
    try:
        model = keras_twins.CONSTRUCTORS[args.model](weights=weights)
        images = args.images or _sample_photos()
        batch = np.stack([keras_twins.load_image(path) for path in images])
    except (ValueError, OSError) as error:  # keras_twins' errors name the problem
        sys.exit(f"error: {' '.join(str(error).split())}")
    expected = model.predict(batch, verbose=0)

    os.makedirs(args.output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as calibration:
        # A real deployment calibrates on a few hundred images of its own domain.
        for i, image in enumerate(batch):
            _save_png(image, os.path.join(calibration, f"{i}.png"))
        files = {
            "float32": export(model, os.path.join(args.output_dir, f"{args.model}.tflite")),
            "float16": export(model, os.path.join(args.output_dir, f"{args.model}_fp16.tflite"),
                              quantize="float16"),
            "int8": export(model, os.path.join(args.output_dir, f"{args.model}_int8.tflite"),
                           quantize="int8", representative_data=calibration),
        }
    print(f"{'file':<8} {'MB':>7} {'top-1 = Keras':>14} {'max |dp|':>9}  GPU delegate")
    for kind, path in files.items():
        outputs = TFLiteClassifier(path)(batch)  # LiteRT's interpreter, a batch of 1 at a time
        agreement = np.mean(outputs.argmax(-1) == expected.argmax(-1))
        report = tflite_report(path)
        print(f"{kind:<8} {os.path.getsize(path) / 1e6:7.1f} {agreement:14.0%} "
              f"{np.abs(outputs - expected).max():9.2e}  {report['gpu_compatibility']}")


def _sample_photos():
    import sklearn.datasets

    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    return [os.path.join(folder, name) for name in ("china.jpg", "flower.jpg")]


def _save_png(image, path):
    from PIL import Image

    Image.fromarray(image.astype(np.uint8)).save(path)


if __name__ == "__main__":
    with quiet_library_chatter():
        main()
