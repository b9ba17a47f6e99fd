import keras

from keras_twins.checks import require_positive_integers
from keras_twins.layers.composite import Composite
from keras_twins.layers.global_subsampled_attention import GlobalSubsampledAttention
from keras_twins.layers.layer_norm import LayerNorm
from keras_twins.layers.locally_grouped_attention import LocallyGroupedSelfAttention
from keras_twins.layers.mlp import MLP
from keras_twins.layers.registration import register
from keras_twins.layers.stochastic_depth import StochasticDepth


@register
class TransformerBlock(Composite):
    """Pre-norm transformer block with LSA or GSA attention.

        x = x + drop_path(attention(norm1(x)))
        x = x + drop_path(mlp(norm2(x)))

    Args:
        dim: channels.
        num_heads: attention heads.
        mlp_ratio: hidden channels of the MLP per input channel.
        sr_ratio: GSA sub-sampling factor (ignored by LSA).
        window_size: LSA window side; 1 selects GSA, as in the reference.
        drop_path_rate: stochastic depth rate of both residual branches.
        dropout: dropout in the MLP and after the attention projection.
        attention_dropout: dropout on the attention weights.
        layer_norm_epsilon: epsilon of norm1 and norm2 (1e-6 in Twins).

    Shapes: `(batch, H, W, dim) -> (batch, H, W, dim)`.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, sr_ratio=1, window_size=1,
                 drop_path_rate=0.0, dropout=0.0, attention_dropout=0.0,
                 layer_norm_epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        require_positive_integers(window_size=window_size, sr_ratio=sr_ratio)
        self.input_spec = keras.InputSpec(ndim=4, axes={-1: dim})
        self.dim = dim
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.sr_ratio = sr_ratio
        self.window_size = window_size
        self.drop_path_rate = drop_path_rate
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.layer_norm_epsilon = layer_norm_epsilon

        policy = self.dtype_policy
        self.norm1 = LayerNorm(
            epsilon=layer_norm_epsilon, dtype=policy, name="norm1"
        )
        attention_args = dict(
            dim=dim, num_heads=num_heads, attention_dropout=attention_dropout,
            projection_dropout=dropout, dtype=policy, name="attention",
        )
        if window_size > 1:
            self.attention = LocallyGroupedSelfAttention(
                window_size=window_size, **attention_args
            )
        else:
            self.attention = GlobalSubsampledAttention(
                sr_ratio=sr_ratio, **attention_args
            )
        self.norm2 = LayerNorm(
            epsilon=layer_norm_epsilon, dtype=policy, name="norm2"
        )
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout=dropout, dtype=policy,
                       name="mlp")
        self.drop_path = StochasticDepth(drop_path_rate, dtype=policy)

    def build(self, input_shape):
        # The drop path too, though it holds no weights: Keras' functional
        # model never calls it (the block's output shape is computed, not
        # traced), and an unbuilt layer stopped `model.quantize`.
        for layer in (self.norm1, self.attention, self.norm2, self.mlp, self.drop_path):
            layer.build(input_shape)

    def call(self, inputs, training=None):
        x = inputs + self.drop_path(
            self.attention(self.norm1(inputs), training=training), training=training
        )
        return x + self.drop_path(
            self.mlp(self.norm2(x), training=training), training=training
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "dim": self.dim,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "sr_ratio": self.sr_ratio,
            "window_size": self.window_size,
            "drop_path_rate": self.drop_path_rate,
            "dropout": self.dropout,
            "attention_dropout": self.attention_dropout,
            "layer_norm_epsilon": self.layer_norm_epsilon,
        }
