import keras
from keras import ops

from keras_twins.layers.registration import register


@register
class StochasticDepth(keras.layers.Layer):
    """Drops a residual branch for whole samples during training (Huang et al., 2016).

    Kept samples are scaled by `1 / (1 - rate)` so the expected value is
    unchanged; at inference the layer is the identity.

    Args:
        rate: probability of dropping the branch of a sample.
        seed: optional seed for the random mask.
    """

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(
                f"`rate` must be in [0, 1). Received: rate={rate}"
            )
        self.rate = rate
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        if not training or self.rate == 0.0:
            return inputs
        keep = 1.0 - self.rate
        mask_shape = (ops.shape(inputs)[0],) + (1,) * (len(inputs.shape) - 1)
        mask = ops.floor(
            keep + keras.random.uniform(mask_shape, seed=self.seed_generator,
                                        dtype=inputs.dtype)
        )
        return inputs / keep * mask

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}
