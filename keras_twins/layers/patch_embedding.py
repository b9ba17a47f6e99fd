import keras

from keras_twins.layers import initializers
from keras_twins.layers.composite import Composite
from keras_twins.layers.layer_norm import LayerNorm
from keras_twins.layers.registration import register


@register
class PatchEmbedding(Composite):
    """Non-overlapping patch embedding: a strided convolution, then LayerNorm.

    Sizes that are not a multiple of `patch_size` are floored, as a "valid"
    convolution (and the reference's PyTorch `Conv2d`) does.

    Args:
        dim: output channels.
        patch_size: side of the square patch, also the stride.
        layer_norm_epsilon: both references hard-code PyTorch's default 1e-5
            here, unlike the 1e-6 of the transformer blocks.

    Shapes: `(batch, H, W, C_in) -> (batch, H // patch_size, W // patch_size, dim)`.
    """

    def __init__(self, dim, patch_size, layer_norm_epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.patch_size = patch_size
        self.layer_norm_epsilon = layer_norm_epsilon
        self.projection = keras.layers.Conv2D(
            dim, patch_size, strides=patch_size, padding="valid", data_format="channels_last",
            kernel_initializer=initializers.convolution(), dtype=self.dtype_policy,
            name="projection",
        )
        self.norm = LayerNorm(
            epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name="norm"
        )

    def build(self, input_shape):
        self.projection.build(input_shape)
        self.norm.build(tuple(input_shape[:-1]) + (self.dim,))

    def call(self, inputs):
        return self.norm(self.projection(inputs))

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape
        p = self.patch_size
        return (
            batch,
            None if height is None else height // p,
            None if width is None else width // p,
            self.dim,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "dim": self.dim,
            "patch_size": self.patch_size,
            "layer_norm_epsilon": self.layer_norm_epsilon,
        }
