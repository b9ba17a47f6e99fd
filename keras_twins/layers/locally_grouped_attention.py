import keras
import numpy as np
from keras import ops

from keras_twins.checks import require_positive_integers
from keras_twins.layers import initializers
from keras_twins.layers.attention import MultiHeadAttentionCore
from keras_twins.layers.registration import register
from keras_twins.layers.tokens import dense_over_tokens


@register
class LocallyGroupedSelfAttention(MultiHeadAttentionCore):
    """LSA: self-attention inside non-overlapping `window_size` windows.

    The map is zero-padded bottom/right to a multiple of `window_size`
    *before* the qkv projection, so padded tokens carry the qkv bias and take
    part in the softmax unmasked; the result is cropped back. This is what
    timm and the official detection code do, and parity depends on it.

    Reference: Chu et al., "Twins: Revisiting the Design of Spatial Attention
    in Vision Transformers", NeurIPS 2021, Sec. 3.2 (Eq. 1).

    Args:
        dim, num_heads, attention_dropout, projection_dropout: see
            `MultiHeadAttentionCore`.
        window_size: side of the square window.

    Shapes: `(batch, H, W, dim) -> (batch, H, W, dim)`, any H and W.
    """

    def __init__(self, dim, num_heads, window_size=7, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        require_positive_integers(window_size=window_size)
        self.window_size = window_size
        self.qkv = keras.layers.Dense(3 * dim, kernel_initializer=initializers.linear(),
                                      dtype=self.dtype_policy, name="qkv")

    def build(self, input_shape):
        self.qkv.build(input_shape)
        self.projection.build(input_shape)

    def call(self, inputs, training=None):
        ws = self.window_size
        _, height, width, _ = ops.shape(inputs)
        pad_bottom = (ws - height % ws) % ws
        pad_right = (ws - width % ws) % ws
        padded = not (isinstance(pad_bottom, int) and isinstance(pad_right, int)
                      and pad_bottom == pad_right == 0)
        x = inputs
        if padded:
            x = ops.pad(x, ((0, 0), (0, pad_bottom), (0, pad_right), (0, 0)))
        rows, cols = (height + pad_bottom) // ws, (width + pad_right) // ws

        # The projection is per token, so it runs on the padded map before the
        # windows are formed.
        # One transpose gathers each window's tokens and puts the q/k/v and
        # head index in front: (3 * heads, batch * rows, cols, ws, ws, head_dim).
        # Splitting along that first axis then copies nothing, where a split
        # over channels and a transpose per tensor each copied q, k and v.
        heads, head_dim = self.num_heads, self.head_dim
        # The attention scale goes into the query's third of the projection.
        query_scale = np.repeat([self.scale, 1.0, 1.0], self.dim)
        x = dense_over_tokens(self.qkv, x, scale=query_scale)
        x = ops.reshape(x, (-1, ws, cols, ws, 3 * heads, head_dim))
        x = ops.reshape(ops.transpose(x, (4, 0, 2, 1, 3, 5)), (3, -1, ws * ws, head_dim))
        query, key, value = (ops.squeeze(t, 0) for t in ops.split(x, 3, axis=0))
        x = self._attend_heads(query, ops.swapaxes(key, 1, 2), value, training=training)

        # And one transpose back: (batch * rows, ws, cols, ws, heads, head_dim).
        x = ops.reshape(x, (heads, -1, cols, ws, ws, head_dim))
        x = ops.reshape(ops.transpose(x, (1, 3, 2, 4, 0, 5)), (-1, rows * ws, cols * ws, self.dim))
        if padded:
            x = x[:, :height, :width, :]
        return self._project(x, training=training)

    def get_config(self):
        return {**super().get_config(), "window_size": self.window_size}
