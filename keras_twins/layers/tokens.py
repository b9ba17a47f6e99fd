import keras
from keras import ops


def dense_over_tokens(layer, tokens, scale=None):
    """Applies a Dense layer to `(..., channels)` tokens as one 2-D matmul.

    Keras' Dense on a rank-3 or rank-4 input becomes a broadcast batch matmul
    in TensorFlow; flattened to `(tokens, channels)` it is a plain MatMul that
    oneDNN runs about 1.6x faster on CPU (the MLP of stage 1 of SVT-S, batch
    16: 38 -> 23 ms), and TFLite gets the 2-D FULLY_CONNECTED it prefers.
    Same weights, same arithmetic per token.

    Static dims stay static, so exported graphs keep fixed shapes.

    `scale` (a number, or one per output channel) multiplies the outputs; see
    `dense_2d`.
    """
    shape = ops.shape(tokens)
    outputs = dense_2d(layer, ops.reshape(tokens, (-1, shape[-1])), scale)
    return ops.reshape(outputs, (-1, *shape[1:-1], layer.units))


def dense_2d(layer, x, scale=None):
    """`layer(x)` for a 2-D `x`, as MatMul + BiasAdd where that is the same.

    `scale` (a number, or one per output channel) multiplies the outputs. It
    is folded into the kernel and bias, which are smaller than the outputs
    (queries at a stage of many tokens), and which a TFLite file holds as
    constants, products included.
    """
    if _plain_tensorflow_dense(layer):
        kernel, bias = layer.kernel, layer.bias
        if scale is not None:
            # As tensors: under mixed precision, of the compute dtype.
            kernel, bias = ops.convert_to_tensor(kernel), ops.convert_to_tensor(bias)
            scale = ops.cast(scale, kernel.dtype)
            kernel, bias = kernel * scale, bias * scale
        return _matmul_bias_add(x, kernel, bias)
    outputs = layer(x)
    return outputs if scale is None else outputs * ops.cast(scale, outputs.dtype)


def _plain_tensorflow_dense(layer):
    """A float Dense with bias and no activation, LoRA or quantization, on TensorFlow."""
    return (keras.backend.backend() == "tensorflow" and layer.use_bias
            and layer.activation is keras.activations.linear
            and layer.quantization_mode is None and not layer.lora_enabled)


def _matmul_bias_add(x, kernel, bias):
    """`x @ kernel + bias`, with the bias as TensorFlow's BiasAdd.

    Keras adds a Dense bias with AddV2. Grappler fuses MatMul with either
    into one oneDNN call, but MatMul + BiasAdd + GELU only with a BiasAdd
    whose output feeds the GELU directly (no reshape between): then the exact
    GELU after fc1 costs next to nothing (stage 1 of SVT-S, batch 16:
    81 -> 44 ms for fc1 and GELU). TFLite reads it as FULLY_CONNECTED with a
    bias, as before.
    """
    import tensorflow as tf

    return tf.nn.bias_add(tf.matmul(x, kernel), bias)
