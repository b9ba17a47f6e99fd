import contextlib
import contextvars
import functools

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

    Inside `onednn_inference_kernels()` (a Twins model's `predict` and
    `evaluate` steps) it runs as oneDNN's fused layer-norm kernel instead.

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
        if (_use_onednn.get() and self.scale and self.center and dtype == "float32"
                and _tracing()):
            outputs = _onednn_layer_norm(x, self.gamma, self.beta, self.epsilon)
            return ops.cast(outputs, self.compute_dtype)
        centered = x - ops.mean(x, axis=-1, keepdims=True)
        variance = ops.mean(centered * centered, axis=-1, keepdims=True)
        outputs = centered * ops.rsqrt(variance + self.epsilon)
        if self.scale:
            outputs = outputs * ops.cast(self.gamma, dtype)
        if self.center:
            outputs = outputs + ops.cast(self.beta, dtype)
        return ops.cast(outputs, self.compute_dtype)


_use_onednn = contextvars.ContextVar("keras_twins_onednn_layer_norm", default=False)


@contextlib.contextmanager
def onednn_inference_kernels():
    """LayerNorms traced inside run as oneDNN's fused kernel, where TensorFlow has it.

    The kernel (`_MklLayerNorm`, what TensorFlow's grappler substitutes for
    Keras 2's LayerNormalization when the batch size is unknown) reads its
    input once and writes once; the ops of `LayerNorm.call` make about six
    passes. One stage-1 norm of PCPVT-S over 8 images on one core took 1.0
    instead of 4.6 ms. It is internal to TensorFlow's CPU build, has no
    gradient and no TFLite or ONNX counterpart, so it is used only for graphs
    that stay in this process and do not train: the `predict` and `evaluate`
    steps of a Twins model (`TwinsModel`), on a TensorFlow that runs on the
    CPU only. Everywhere else, and for exported graphs, the plain ops run.
    """
    token = _use_onednn.set(_onednn_available())
    try:
        yield
    finally:
        _use_onednn.reset(token)


@functools.cache
def _onednn_available():
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    try:
        from tensorflow.python.framework import kernels

        registered = kernels.get_registered_kernels_for_op("_MklLayerNorm").kernel
    except Exception:  # an internal API: a TensorFlow without it runs the plain ops
        return False
    accelerators = tf.config.list_logical_devices("GPU") + tf.config.list_logical_devices("TPU")
    return any(kernel.device_type == "CPU" for kernel in registered) and not accelerators


def _tracing():
    import tensorflow as tf

    return tf.inside_function()  # Keras' eager steps (`run_eagerly`) keep the plain ops


def _onednn_layer_norm(x, gamma, beta, epsilon):
    """`_MklLayerNorm` over the last axis of `x`, as a node of the graph being traced."""
    import tensorflow as tf

    flat = tf.reshape(x, (-1, x.shape[-1]))  # the kernel takes 2-D or 3-D inputs
    attrs = {"T": tf.compat.v1.AttrValue(type=tf.float32.as_datatype_enum),
             "epsilon": tf.compat.v1.AttrValue(f=float(epsilon))}
    graph = tf.compat.v1.get_default_graph()
    normalized = graph.create_op(
        "_MklLayerNorm", [flat, tf.convert_to_tensor(gamma), tf.convert_to_tensor(beta)],
        [tf.float32], name=graph.unique_name("onednn_layer_norm"), attrs=attrs).outputs[0]
    return tf.reshape(normalized, tf.shape(x))
