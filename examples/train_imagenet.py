"""Train Twins on ImageNet-1k from scratch with the paper's recipe.

    python examples/train_imagenet.py --manual-dir /data/imagenet --output runs/svt_s \
        [--model twins_svt_small] [--batch-size 128] [--strategy auto] [--tpu NAME]

`tfds:imagenet2012` reads ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar
from `--manual-dir` (prepared once by tensorflow-datasets). The recipe is the
paper's: 300 epochs, AdamW at 1e-3 x global batch / 1024, weight decay 0.05,
5 warm-up epochs then cosine decay, gradient clipping 5.0, label smoothing
0.1, RandAugment, MixUp / CutMix, random erasing, and stochastic depth 0.2 /
0.3 / 0.5 for small / base / large. The paper trained with a global batch of
1024: 8 GPUs x 128 (`--strategy mirrored`), or a TPU slice.

Killed or preempted, the same command resumes from `OUTPUT/backup`.
"""

import os
import sys

from weights_convert.console import quiet_library_chatter

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# TensorFlow's runtime writes notices to stderr as it loads and as it first
# runs, which TF_CPP_MIN_LOG_LEVEL does not silence: they would bury a
# one-line error. Python's sys.stderr still writes.
with quiet_library_chatter():
    from keras_twins.cli import ArgumentParser
    from keras_twins.training import train


def main():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manual-dir", required=True, help="folder of the ImageNet tars")
    parser.add_argument("--data-dir", help="tensorflow-datasets data folder")
    parser.add_argument("--output", required=True)
    parser.add_argument("--model", default="twins_svt_small")
    parser.add_argument("--batch-size", type=int, default=128, help="per replica")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--tpu")
    parser.add_argument("--mixed-precision", default="bfloat16")
    args = parser.parse_args()

    try:
        result = train("tfds:imagenet2012", args.model, output=args.output, image_size=224,
                       epochs=args.epochs, batch_size=args.batch_size, augment="imagenet",
                       strategy=args.strategy, tpu=args.tpu,
                       mixed_precision=args.mixed_precision, backup_freq=1000,
                       data_dir=args.data_dir, manual_dir=args.manual_dir)
    except (ValueError, OSError) as error:  # keras_twins' errors name the problem
        sys.exit(f"error: {' '.join(str(error).split())}")
    print(f"validation top-1 {result.history['val_accuracy'][-1]:.4f}, "
          f"top-5 {result.history['val_top5'][-1]:.4f}; model in {args.output}/model.keras")


if __name__ == "__main__":
    with quiet_library_chatter():
        main()
