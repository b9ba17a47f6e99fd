"""Images of other than three channels: how ImageNet's RGB carries over.

A model built with `input_shape=(H, W, C)` normalizes its C channels with
`pixel_statistics(C)` and, given 3-channel weights, starts from
`adapt_stem_kernel(kernel, C)`: the rule timm applies for `in_chans`. The
two agree: an image whose C channels repeat R, G, B, R, ... gives the
features of the RGB image, and a grayscale one nearly those of its gray
RGB copy (exactly, if ImageNet's three means and stds were equal).
"""

import math

import numpy as np

from keras_twins.variants import IMAGENET_MEAN
from keras_twins.variants import IMAGENET_STD

RGB = 3


def pixel_statistics(channels):
    """`(mean, std)`, one value per channel, for pixels scaled to [0, 1]:
    ImageNet's for RGB, their averages for one channel, and R, G, B
    repeated for any other count."""
    if channels == 1:
        return (float(np.mean(IMAGENET_MEAN)),), (float(np.mean(IMAGENET_STD)),)
    return tuple(_repeated(IMAGENET_MEAN, channels)), tuple(_repeated(IMAGENET_STD, channels))


def adapt_stem_kernel(kernel, channels):
    """The first convolution's RGB `kernel`, `(kh, kw, 3, out)` as Keras
    keeps it, for `channels` input channels: summed over R, G and B for one,
    otherwise R, G, B repeated and scaled by 3 / channels, so that the
    layer's output keeps its scale."""
    kernel = np.asarray(kernel)
    if kernel.ndim != 4 or kernel.shape[2] != RGB:
        raise ValueError(f"Only a first convolution of {RGB} input channels is adapted to "
                         f"other counts. Received: a kernel of shape {kernel.shape}")
    if channels == 1:
        return kernel.sum(axis=2, keepdims=True)
    repeated = np.concatenate([kernel] * math.ceil(channels / RGB), axis=2)[:, :, :channels]
    return (repeated * (RGB / channels)).astype(kernel.dtype)


def _repeated(values, count):
    return [values[i % len(values)] for i in range(count)]
