"""tf2onnx learns TensorFlow's `Erfc` as `1 - Erf`.

The exact GELU of every Twins MLP computes `Erfc` in TensorFlow, and
tf2onnx 1.17 maps it to no ONNX op: Keras' own `model.export(format="onnx")`
wrote a file that onnxruntime refused ("No Op registered for Erfc"). Importing
keras_twins on Keras' TensorFlow backend registers the conversion in
tf2onnx's table of op handlers, its documented way to add one, so that
Keras' export works too, for a Twins under a new head as well;
`keras_twins.export` relies on the same entry.
"""

import numpy as np


def register_erfc():
    """Adds the conversion to tf2onnx's handlers; False where tf2onnx is not
    installed, or Keras runs on another backend than TensorFlow (which
    tf2onnx would import)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return False
    try:
        from tf2onnx import handler
    except ImportError:
        return False

    class Erfc:
        @classmethod
        def version_9(cls, ctx, node, **kwargs):  # ONNX's Erf is from opset 9
            _one_minus_erf(ctx, node)

    handler.tf_op("Erfc")(Erfc)
    return True


def _one_minus_erf(ctx, node):
    """erfc(x) = 1 - erf(x): the node becomes an Erf followed by a Sub from one."""
    from tf2onnx import utils

    node.type = "Erf"
    one = ctx.make_const(utils.make_name(f"{node.name}_one"), np.array(1.0, np.float32))
    difference = ctx.insert_new_node_on_output("Sub", node.output[0],
                                               name=utils.make_name(f"{node.name}_erfc"))
    ctx.replace_inputs(difference, [one.output[0], node.output[0]])
