"""The reference's initialization (timm's `Twins._init_weights`), for training from scratch.

Linear layers draw from N(0, 0.02): timm's `trunc_normal_(std=.02)` cuts at
+-2 absolute, 100 standard deviations, so nothing is cut (Keras'
`TruncatedNormal` would cut at 2 deviations and shrink the spread by 12%).
Convolutions draw from N(0, sqrt(2 / fan_out)), fan_out = kh * kw * out /
groups: Keras' fan_out of a depthwise kernel (kh, kw, C, 1) is kh * kw,
timm's too. Biases are zero and LayerNorms one and zero, as Keras' defaults.

The values are drawn with NumPy, on the host. Keras' own initializers draw
with the backend's random ops, and on JAX each new kernel shape compiled
them again: 96 compilations, 13 of the 14 s it took to build SVT-S on a
2-core CPU.
"""

import math
import random

import keras
import numpy as np


@keras.saving.register_keras_serializable(package="keras_twins")
class Normal(keras.initializers.Initializer):
    """Zero-mean normal values: of `stddev`, or of sqrt(`fan_out_scale` / fan_out).

    Unseeded, each call draws its seed from Python's `random`, which
    `keras.utils.set_random_seed` seeds: a model built after it is the same
    model each time.
    """

    def __init__(self, stddev=None, fan_out_scale=None, seed=None):
        if (stddev is None) == (fan_out_scale is None):
            raise ValueError("Normal takes one of `stddev` and `fan_out_scale`. Received: "
                             f"stddev={stddev}, fan_out_scale={fan_out_scale}")
        self.stddev, self.fan_out_scale, self.seed = stddev, fan_out_scale, seed

    def __call__(self, shape, dtype=None):
        shape = tuple(int(side) for side in shape)
        stddev = self.stddev
        if stddev is None:
            stddev = math.sqrt(self.fan_out_scale / max(1, _fan_out(shape)))
        seed = random.randint(1, 2**31 - 1) if self.seed is None else self.seed
        values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        values *= np.float32(stddev)
        return keras.ops.convert_to_tensor(values, dtype=dtype or keras.config.floatx())

    def get_config(self):
        return {"stddev": self.stddev, "fan_out_scale": self.fan_out_scale, "seed": self.seed}


def _fan_out(shape):
    """Keras' fan_out: the last axis, times a kernel's receptive field."""
    if len(shape) < 2:
        return shape[0] if shape else 1
    return shape[-1] * math.prod(shape[:-2])


def linear():
    return Normal(stddev=0.02)


def convolution():
    return Normal(fan_out_scale=2.0)
