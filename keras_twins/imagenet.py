"""ImageNet-1k class names, `preprocess_input` and `decode_predictions`.

The class names ship with the package (`data/imagenet_classes.json`: WordNet
id and a unique short name per class index), so decoding needs no download.
"""

import functools
import json
import os

import numpy as np

NUM_CLASSES = 1000
_CLASSES_FILE = os.path.join(os.path.dirname(__file__), "data", "imagenet_classes.json")


@functools.cache
def imagenet_classes():
    """The 1000 `(wordnet_id, name)` pairs, in class-index order."""
    with open(_CLASSES_FILE, encoding="utf-8") as f:
        return tuple(tuple(entry) for entry in json.load(f))


def preprocess_input(x, data_format=None):
    """A placeholder for compatibility with keras.applications; returns `x`.

    Twins models normalize inside (`include_preprocessing=True`, the
    default), so they take RGB pixels in [0, 255] as they are. A model built
    with `include_preprocessing=False` expects inputs already normalized with
    `keras_twins.variants.IMAGENET_MEAN` / `IMAGENET_STD`, as timm's do.

    Args:
        x: a batch of RGB images, pixels in [0, 255].
        data_format: unused, for signature compatibility.
    """
    del data_format
    return x


def decode_predictions(preds, top=5):
    """Decodes a batch of ImageNet predictions into readable classes.

    Args:
        preds: array of shape `(samples, 1000)`, probabilities or logits.
        top: how many of the best classes to return per sample.

    Returns:
        One list per sample of `(wordnet_id, name, score)` tuples, best first.
    """
    preds = np.asarray(preds)
    if preds.ndim != 2 or preds.shape[1] != NUM_CLASSES:
        raise ValueError(
            "`decode_predictions` expects a batch of predictions (i.e. a 2D "
            f"array of shape (samples, {NUM_CLASSES})). Received array with "
            f"shape: {preds.shape}"
        )
    classes = imagenet_classes()
    results = []
    for row in preds:
        best = np.argsort(row)[::-1][:top]
        results.append([(*classes[i], float(row[i])) for i in best])
    return results
