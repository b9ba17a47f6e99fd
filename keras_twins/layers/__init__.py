"""The building blocks of Twins, each a serializable Keras layer."""

from keras_twins.layers.attention import MultiHeadAttentionCore
from keras_twins.layers.global_subsampled_attention import GlobalSubsampledAttention
from keras_twins.layers.layer_norm import LayerNorm
from keras_twins.layers.locally_grouped_attention import LocallyGroupedSelfAttention
from keras_twins.layers.mlp import MLP
from keras_twins.layers.patch_embedding import PatchEmbedding
from keras_twins.layers.positional_encoding import PositionalEncodingGenerator
from keras_twins.layers.stochastic_depth import StochasticDepth
from keras_twins.layers.transformer_block import TransformerBlock

__all__ = [
    "GlobalSubsampledAttention",
    "LayerNorm",
    "LocallyGroupedSelfAttention",
    "MLP",
    "MultiHeadAttentionCore",
    "PatchEmbedding",
    "PositionalEncodingGenerator",
    "StochasticDepth",
    "TransformerBlock",
]
