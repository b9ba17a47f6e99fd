"""The attention core shared by LSA and GSA: scores, softmax, weighted sum.

Everything is a reshape, a 4-D transpose, a matmul or a softmax, the ops
that TFLite, ONNX and their GPU delegates all support.
"""

import contextlib
import math

import keras
from keras import ops

from keras_twins.checks import require_positive_integers
from keras_twins.layers import initializers
from keras_twins.layers.composite import Composite
from keras_twins.layers.tokens import dense_over_tokens

# At most this many 2-D products per attention matmul when they are traced one
# by one (`products_as_fully_connected`); beyond it the graph grows too large.
MAX_UNROLLED_PRODUCTS = 256
_unrolling = False


@contextlib.contextmanager
def products_as_fully_connected(enabled=True):
    """Traces attention matmuls of static shape as one 2-D matmul per head and window.

    For full-integer TFLite: the converter turns each into FULLY_CONNECTED,
    whose int8 kernel in LiteRT ran about 10x faster than its int8
    BATCH_MATMUL on the same product (GSA of stage 1 of SVT-S: 0.21 vs
    2.1 ms), and XNNPACK has neither in int8. Float graphs keep BATCH_MATMUL,
    which XNNPACK runs faster. Same arithmetic either way.
    """
    global _unrolling
    previous, _unrolling = _unrolling, enabled
    try:
        yield
    finally:
        _unrolling = previous


def _matmul(a, b):
    """`a @ b` over `(..., n, k) x (..., k, m)`, unrolled where that is on."""
    lead = tuple(a.shape[:-2])
    static = None not in (*lead, *b.shape[:-2])
    count = math.prod(lead) if static else None
    if not (_unrolling and static and count <= MAX_UNROLLED_PRODUCTS):
        return ops.matmul(a, b)
    import tensorflow as tf

    # x @ y^T with y as rows: the form TFLite's FULLY_CONNECTED takes.
    rows = ops.reshape(ops.swapaxes(b, -1, -2), (count, b.shape[-1], b.shape[-2]))
    a = ops.reshape(a, (count, *a.shape[-2:]))
    products = [tf.matmul(x, y, transpose_b=True)
                for x, y in zip(ops.unstack(a, count), ops.unstack(rows, count))]
    return ops.reshape(ops.stack(products), (*lead, a.shape[-2], b.shape[-1]))


class MultiHeadAttentionCore(Composite):
    """Base of the two Twins attentions; subclasses form queries, keys and values.

    Args:
        dim: channels of the input and output tokens.
        num_heads: attention heads; `dim` must be a multiple of it.
        attention_dropout: dropout on the attention weights.
        projection_dropout: dropout after the output projection.
    """

    def __init__(self, dim, num_heads, attention_dropout=0.0,
                 projection_dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        require_positive_integers(dim=dim, num_heads=num_heads)
        if dim % num_heads:
            raise ValueError(
                f"`dim` must be a multiple of `num_heads`. "
                f"Received: dim={dim}, num_heads={num_heads}"
            )
        self.dim = dim
        self.num_heads = num_heads
        # Refuses token sequences and other channel counts in one line at the call.
        self.input_spec = keras.InputSpec(ndim=4, axes={-1: dim})
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.attention_dropout = attention_dropout
        self.projection_dropout = projection_dropout
        self.attention_dropout_layer = keras.layers.Dropout(
            attention_dropout, dtype=self.dtype_policy
        )
        self.projection = keras.layers.Dense(
            dim, kernel_initializer=initializers.linear(), dtype=self.dtype_policy,
            name="projection",
        )
        self.projection_dropout_layer = keras.layers.Dropout(
            projection_dropout, dtype=self.dtype_policy
        )

    def _split_heads(self, tokens, perm):
        """`(batch, n, dim)` -> `(batch, n, heads, head_dim)`, transposed by `perm`."""
        n = ops.shape(tokens)[1]
        tokens = ops.reshape(tokens, (-1, n, self.num_heads, self.head_dim))
        return ops.transpose(tokens, perm)

    def _attend(self, query, key, value, training=None):
        """softmax(q k^T / sqrt(head_dim)) v over token sequences.

        Args:
            query: `(batch, n_query, dim)`, times `self.scale` (folded into
                the projection that makes it; `tokens.dense_2d`).
            key, value: `(batch, n_key, dim)`.

        Returns:
            `(batch, n_query, dim)`, heads concatenated head-major.
        """
        n_query = ops.shape(query)[1]
        query = self._split_heads(query, (0, 2, 1, 3))
        # Keys go straight to (batch, heads, head_dim, n_key): no later k^T.
        key = self._split_heads(key, (0, 2, 3, 1))
        value = self._split_heads(value, (0, 2, 1, 3))
        out = ops.transpose(self._attend_heads(query, key, value, training), (0, 2, 1, 3))
        return ops.reshape(out, (-1, n_query, self.dim))

    def _attend_heads(self, query, transposed_key, value, training=None):
        """softmax(q k^T / sqrt(head_dim)) v, one head per batch entry.

        Args:
            query: `(..., n_query, head_dim)`, times `self.scale`.
            transposed_key: `(..., head_dim, n_key)`.
            value: `(..., n_key, head_dim)`.

        Returns:
            `(..., n_query, head_dim)`.
        """
        scores = _matmul(query, transposed_key)
        if transposed_key.shape[-1] == 1:
            # One key (GSA on a map smaller than its sub-sampling window):
            # the softmax is exactly 1, so skip it and Keras' warning about it.
            # In training its gradient must be zero, not missing, so that the
            # query still gets weight decay (as in PyTorch) and Keras does not
            # warn that the query has no gradient.
            weights = ops.ones_like(scores)
            if training:
                weights = weights + 0.0 * scores
        else:
            # float32 even under mixed precision, so large scores cannot
            # overflow; both casts vanish from a float32 graph.
            weights = ops.cast(ops.softmax(ops.cast(scores, "float32"), axis=-1),
                               scores.dtype)
        weights = self.attention_dropout_layer(weights, training=training)
        return _matmul(weights, value)

    def _project(self, x, training=None):
        return self.projection_dropout_layer(dense_over_tokens(self.projection, x),
                                             training=training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "dim": self.dim,
            "num_heads": self.num_heads,
            "attention_dropout": self.attention_dropout,
            "projection_dropout": self.projection_dropout,
        }
