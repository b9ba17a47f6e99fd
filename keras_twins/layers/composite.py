"""The base of keras_twins' layers made of other layers."""

import keras
from keras.dtype_policies import DTypePolicyMap


class Composite(keras.layers.Layer):
    """A layer of sublayers whose config keeps the policies `model.quantize` gave them.

    The sublayers are made in `__init__` with `dtype=self.dtype_policy`, so a
    saved layer rebuilds them from its own `dtype`. After
    `model.quantize("int8")` the Dense sublayers hold int8 kernels and
    scales under an `int8_from_float32` policy, and a saved model failed to
    load ("expected 2 variables, but received 3"). Such a layer's config
    gives, as its `dtype`, a `DTypePolicyMap` from the quantized sublayers'
    paths to their policies, with its own policy as the default (as
    keras-hub's backbones do); each sublayer finds its own there by path as
    it is built again.
    """

    def get_config(self):
        config = super().get_config()
        if isinstance(self.dtype_policy, DTypePolicyMap):
            return config  # a loaded layer's map, which quantizing again updates
        quantized = {layer.path: layer.dtype_policy
                     for layer in self._flatten_layers(include_self=False)
                     if layer.quantization_mode is not None}
        if quantized:
            config["dtype"] = keras.dtype_policies.serialize(
                DTypePolicyMap(default_policy=self.dtype_policy, policy_map=quantized))
        return config
