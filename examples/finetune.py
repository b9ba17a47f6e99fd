"""Fine-tune ImageNet-pretrained Twins on a dataset of your own.

    python examples/finetune.py DATA --output runs/flowers [--model twins_svt_small]
        [--weights imagenet|PATH] [--epochs 30] [--image-size 224]
        [--train-split train] [--validation-split auto]

DATA is `tfds:NAME` or an image folder `DATA/train/LABEL/*.jpg` with
`DATA/validation/LABEL/*.jpg` beside it. Data with only a train split
(`tfds:tf_flowers`, or a folder with only `DATA/train`) can hold out a tenth
of it: `--train-split 'train[:90%]' --validation-split 'train[90%:]'`. The
backbone starts from the ImageNet weights (or a timm / official checkpoint);
the head is new, sized to DATA's classes. Fine-tuning settings: light
augmentation, a lower peak learning rate, one warm-up epoch, drop path 0.1.
Then the trained model is exported to TFLite for a phone.
"""

import os
import sys

from weights_convert.console import printable
from weights_convert.console import quiet_library_chatter

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# TensorFlow's runtime writes notices to stderr as it loads and as it first
# runs, which TF_CPP_MIN_LOG_LEVEL does not silence: they would bury a
# one-line error. Python's sys.stderr still writes.
with quiet_library_chatter():
    from keras_twins.cli import ArgumentParser
    from keras_twins.export import export
    from keras_twins.training import train


def main():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--output", required=True)
    parser.add_argument("--model", default="twins_svt_small")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--validation-split", default="auto", help="a split, auto or none")
    args = parser.parse_args()

    try:
        result = train(args.data, args.model, output=args.output, weights=args.weights,
                       image_size=args.image_size, epochs=args.epochs,
                       batch_size=args.batch_size, augment="light", learning_rate=1e-4,
                       warmup_epochs=1, drop_path_rate=0.1, weight_decay=0.05,
                       train_split=args.train_split,
                       validation_split=None if args.validation_split == "none"
                       else args.validation_split)
    except (ValueError, OSError) as error:  # keras_twins' errors name the problem
        sys.exit(f"error: {' '.join(str(error).split())}")
    # A terminal that cannot show a class name's characters gets them escaped.
    print(printable(f"classes: {', '.join(result.class_names)}", sys.stdout))
    if "val_accuracy" in result.history:
        print(f"validation top-1: {result.history['val_accuracy'][-1]:.4f}")
    path = export(result.model, os.path.join(args.output, "model.tflite"),
                  labels=result.class_names)
    print(printable(f"TFLite file for Android: {path} (labels.txt beside it)", sys.stdout))


if __name__ == "__main__":
    with quiet_library_chatter():
        main()
