import keras
from keras import ops

from keras_twins.checks import require_positive_integers
from keras_twins.layers import initializers
from keras_twins.layers.registration import register


@register
class PositionalEncodingGenerator(keras.layers.Layer):
    """The PEG of CPVT: a 3x3 depthwise convolution added back to its input.

    Zero padding lets the convolution infer absolute position from the
    borders, so the encoding follows any input size (Chu et al., 2021, Sec. 3.1).

    The convolution is written with `ops.depthwise_conv` and a separate bias
    add rather than a `DepthwiseConv2D` layer: TensorFlow's oneDNN remapper
    fails (loudly) on the fused depthwise + bias + residual-add pattern.

    Shapes: `(batch, H, W, C) -> (batch, H, W, C)`.
    """

    def __init__(self, kernel_size=3, **kwargs):
        super().__init__(**kwargs)
        require_positive_integers(kernel_size=kernel_size)
        self.kernel_size = kernel_size
        self.input_spec = keras.InputSpec(ndim=4)

    def build(self, input_shape):
        channels = input_shape[-1]
        self.input_spec = keras.InputSpec(ndim=4, axes={-1: channels})
        self.depthwise_kernel = self.add_weight(
            name="depthwise_kernel",
            shape=(self.kernel_size, self.kernel_size, channels, 1),
            initializer=initializers.convolution(),
        )
        self.bias = self.add_weight(name="bias", shape=(channels,), initializer="zeros")

    def call(self, inputs):
        encoding = ops.depthwise_conv(inputs, self.depthwise_kernel, strides=1,
                                      padding="same", data_format="channels_last")
        return encoding + self.bias + inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size}
