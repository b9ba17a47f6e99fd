import keras
from keras import ops

from keras_twins.layers.registration import register


@register
class LayerNorm(keras.layers.LayerNormalization):
    """`keras.layers.LayerNormalization`, written so that it exports and runs fast.

    Same arguments, weights and results (to float rounding); over the last
    axis it computes `(x - mean) * rsqrt(var + eps) * gamma + beta`. Keras
    writes it as `x * inv + (beta - mean * inv)` with `inv = gamma * rsqrt(..)`,
    which costs one more full-size op, keeps the TFLite converter from folding
    gamma and beta into the next fully-connected layer, and brings a NEG, which
    has no int8 kernel in LiteRT: a full-integer TFLite file then went back to
    float32 around every LayerNorm (and ran 1.5x slower, 64 vs 41 ms on SVT-S).

    Shapes: any; normalizes over `axis` (default the last).
    """

    def call(self, inputs):
        last_axis = (-1, len(inputs.shape) - 1)
        axis = self.axis[0] if isinstance(self.axis, list) and len(self.axis) == 1 else self.axis
        if self.rms_scaling or axis not in last_axis:
            return super().call(inputs)
        # Statistics in float32 at least, as Keras does under mixed precision.
        dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = ops.cast(inputs, dtype)
        centered = x - ops.mean(x, axis=-1, keepdims=True)
        variance = ops.mean(centered * centered, axis=-1, keepdims=True)
        outputs = centered * ops.rsqrt(variance + self.epsilon)
        if self.scale:
            outputs = outputs * ops.cast(self.gamma, dtype)
        if self.center:
            outputs = outputs + ops.cast(self.beta, dtype)
        return ops.cast(outputs, self.compute_dtype)
