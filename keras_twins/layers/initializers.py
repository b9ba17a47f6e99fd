"""The reference's initialization (timm's `Twins._init_weights`), for training from scratch.

Linear layers draw from N(0, 0.02): timm's `trunc_normal_(std=.02)` cuts at
+-2 absolute, 100 standard deviations, so nothing is cut (Keras'
`TruncatedNormal` would cut at 2 deviations and shrink the spread by 12%).
Convolutions draw from N(0, sqrt(2 / fan_out)), fan_out = kh * kw * out /
groups: Keras' fan_out of a depthwise kernel (kh, kw, C, 1) is kh * kw,
timm's too. Biases are zero and LayerNorms one and zero, as Keras' defaults.
Each call gives a new initializer, as Keras wants one per variable.
"""

import keras


def linear():
    return keras.initializers.RandomNormal(stddev=0.02)


def convolution():
    return keras.initializers.VarianceScaling(2.0, mode="fan_out",
                                              distribution="untruncated_normal")
