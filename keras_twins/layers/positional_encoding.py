import keras

from keras_twins.layers.registration import register


@register
class PositionalEncodingGenerator(keras.layers.Layer):
    """The PEG of CPVT: a 3x3 depthwise convolution added back to its input.

    Zero padding lets the convolution infer absolute position from the
    borders, so the encoding follows any input size (Chu et al., 2021, Sec. 3.1).

    Shapes: `(batch, H, W, C) -> (batch, H, W, C)`.
    """

    def __init__(self, kernel_size=3, **kwargs):
        super().__init__(**kwargs)
        self.kernel_size = kernel_size
        self.depthwise = keras.layers.DepthwiseConv2D(
            kernel_size, padding="same", dtype=self.dtype_policy, name="depthwise"
        )

    def build(self, input_shape):
        self.depthwise.build(input_shape)

    def call(self, inputs):
        return self.depthwise(inputs) + inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size}
