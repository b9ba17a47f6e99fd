import keras
from keras import ops

from keras_twins.checks import require_positive_integers
from keras_twins.layers import initializers
from keras_twins.layers.attention import MultiHeadAttentionCore
from keras_twins.layers.layer_norm import LayerNorm
from keras_twins.layers.registration import register
from keras_twins.layers.tokens import dense_over_tokens


@register
class GlobalSubsampledAttention(MultiHeadAttentionCore):
    """GSA: every token attends to a sub-sampled summary of the whole map.

    Keys and values come from a `sr_ratio`-strided convolution ("valid", so
    odd sizes are floored) followed by LayerNorm (eps 1e-5, as both
    references hard-code). With `sr_ratio=1` it is plain global attention.

    Reference: Chu et al., 2021, Sec. 3.2; identical to PVT's spatial-reduction
    attention (Wang et al., 2021).

    Args:
        dim, num_heads, attention_dropout, projection_dropout: see
            `MultiHeadAttentionCore`.
        sr_ratio: sub-sampling factor of keys and values.
        layer_norm_epsilon: epsilon of the sub-sampling LayerNorm.

    Shapes: `(batch, H, W, dim) -> (batch, H, W, dim)`; H, W >= `sr_ratio`.
    """

    def __init__(self, dim, num_heads, sr_ratio=1, layer_norm_epsilon=1e-5,
                 **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        require_positive_integers(sr_ratio=sr_ratio)
        self.sr_ratio = sr_ratio
        self.layer_norm_epsilon = layer_norm_epsilon
        self.query = keras.layers.Dense(dim, kernel_initializer=initializers.linear(),
                                        dtype=self.dtype_policy, name="query")
        self.key_value = keras.layers.Dense(2 * dim, kernel_initializer=initializers.linear(),
                                            dtype=self.dtype_policy, name="key_value")
        if sr_ratio > 1:
            self.subsample = keras.layers.Conv2D(
                dim, sr_ratio, strides=sr_ratio, padding="valid", data_format="channels_last",
                kernel_initializer=initializers.convolution(), dtype=self.dtype_policy,
                name="subsample",
            )
            self.subsample_norm = LayerNorm(
                epsilon=layer_norm_epsilon, dtype=self.dtype_policy,
                name="subsample_norm",
            )

    def build(self, input_shape):
        if any(side is not None and side < self.sr_ratio for side in input_shape[1:3]):
            raise ValueError(
                f"`{self.name}` sub-samples by sr_ratio={self.sr_ratio}, so it takes maps of "
                f"at least {self.sr_ratio}x{self.sr_ratio}. Received: input_shape={input_shape}"
            )
        for layer in (self.query, self.key_value, self.projection):
            layer.build(input_shape)
        if self.sr_ratio > 1:
            self.subsample.build(input_shape)
            self.subsample_norm.build(input_shape)

    def call(self, inputs, training=None):
        _, height, width, _ = ops.shape(inputs)
        summary = inputs
        if self.sr_ratio > 1:
            summary = self.subsample_norm(self.subsample(inputs))
        _, summary_height, summary_width, _ = ops.shape(summary)
        query = ops.reshape(dense_over_tokens(self.query, inputs, scale=self.scale),
                            (-1, height * width, self.dim))
        key_value = ops.reshape(dense_over_tokens(self.key_value, summary),
                                (-1, summary_height * summary_width, 2 * self.dim))
        if summary.shape[1:3] == (1, 1):
            # One key, whose attention weight is exactly 1: outside training
            # the key is unused. A SPLIT with an unused output stayed float32
            # in a full-integer TFLite file; slices let the converter drop it.
            key, value = key_value[..., :self.dim], key_value[..., self.dim:]
        else:
            key, value = ops.split(key_value, 2, axis=-1)  # channels are [k | v]
        x = self._attend(query, key, value, training=training)
        x = ops.reshape(x, (-1, height, width, self.dim))
        return self._project(x, training=training)

    def get_config(self):
        return {
            **super().get_config(),
            "sr_ratio": self.sr_ratio,
            "layer_norm_epsilon": self.layer_norm_epsilon,
        }

