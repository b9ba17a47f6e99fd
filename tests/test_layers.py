"""Each public layer: serialization, shapes, and the ops it compiles to."""

import numpy as np
import pytest
import tensorflow as tf

import keras
import keras_twins
from conftest import TINY
from keras_twins import layers
from keras_twins.layers.attention import products_as_fully_connected
from keras_twins.layers.layer_norm import onednn_inference_kernels

LAYERS = [
    (layers.LayerNorm(epsilon=1e-6), (2, 9, 11, 16)),
    (layers.PatchEmbedding(16, 4), (2, 33, 47, 3)),
    (layers.PositionalEncodingGenerator(), (2, 9, 11, 16)),
    (layers.LocallyGroupedSelfAttention(16, 2, window_size=7), (2, 9, 11, 16)),
    (layers.GlobalSubsampledAttention(16, 2, sr_ratio=4), (2, 9, 11, 16)),
    (layers.GlobalSubsampledAttention(16, 2, sr_ratio=1), (2, 9, 11, 16)),
    (layers.MLP(16, 40), (2, 9, 11, 16)),
    (layers.StochasticDepth(0.3), (2, 9, 11, 16)),
    (layers.TransformerBlock(16, 2, window_size=7, drop_path_rate=0.1), (2, 9, 11, 16)),
    (layers.TransformerBlock(16, 2, sr_ratio=2), (2, 9, 11, 16)),
]


@pytest.mark.parametrize("layer, shape", LAYERS, ids=lambda v: type(v).__name__)
def test_layer_serializes_and_rebuilds_identically(layer, shape):
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    y = layer(x)
    assert tuple(y.shape) == tuple(layer.compute_output_shape(shape))
    config = keras.saving.serialize_keras_object(layer)
    clone = keras.saving.deserialize_keras_object(config)
    clone(x)
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(clone(x), y)
    assert clone.get_config() == layer.get_config()


FORBIDDEN = {"Roll", "Gather", "GatherV2", "GatherNd", "Einsum", "ExtractImagePatches",
             "ScatterNd", "Shape", "Pack", "Prod"}
ALLOWED_ATTENTION_CORE = {"Reshape", "Transpose", "BatchMatMulV2", "Softmax"}


@pytest.mark.parametrize("layer", [
    layers.LocallyGroupedSelfAttention(16, 2, window_size=7),
    layers.GlobalSubsampledAttention(16, 2, sr_ratio=4),
], ids=lambda v: type(v).__name__)
def test_attention_uses_only_reshape_transpose_matmul_softmax(layer):
    function = tf.function(lambda x: layer(x))
    graph = function.get_concrete_function(tf.TensorSpec((1, 9, 11, 16))).graph
    types = {op.type for op in graph.get_operations()}
    assert not types & FORBIDDEN, types & FORBIDDEN
    assert ALLOWED_ATTENTION_CORE <= types
    # Anything else comes from Dense/Conv/LayerNorm, padding, crop and the q/k/v split.
    others = types - ALLOWED_ATTENTION_CORE - {
        "Placeholder", "ReadVariableOp", "Const", "Identity", "NoOp", "MatMul",
        "BiasAdd", "AddV2", "Add", "Mul", "Pad", "PadV2", "StridedSlice", "Split",
        "SplitV", "Conv2D", "Mean", "SquaredDifference", "Sub", "Rsqrt", "Square",
        "StopGradient", "Cast", "Tensordot", "RealDiv", "Sqrt", "Maximum", "Neg", "Squeeze",
    }
    assert not others, others
    # The attention scale multiplies the query projection's kernel and bias,
    # not the queries: no product over tokens outside the sub-sampling norm.
    scaled = [op.outputs[0].shape for op in graph.get_operations()
              if op.type == "Mul" and "_norm" not in op.name]
    assert scaled and all(shape.rank <= 2 for shape in scaled), scaled


@pytest.mark.parametrize("layer", [
    layers.LocallyGroupedSelfAttention(16, 2, window_size=3),
    layers.GlobalSubsampledAttention(16, 2, sr_ratio=2),
], ids=lambda v: type(v).__name__)
def test_attention_products_one_by_one_give_the_same_result(layer):
    """The form full-integer TFLite export traces: 2-D matmuls, no BatchMatMul."""
    x = np.random.default_rng(2).standard_normal((2, 9, 11, 16)).astype("float32")
    expected = layer(x)
    function = tf.function(lambda t: layer(t))
    with products_as_fully_connected():
        unrolled = function.get_concrete_function(tf.TensorSpec(x.shape))
    types = {op.type for op in unrolled.graph.get_operations()}
    assert "BatchMatMulV2" not in types and "MatMul" in types
    np.testing.assert_allclose(unrolled(tf.constant(x)), expected, atol=1e-5)
    # Off again after the block, and a dynamic batch never unrolls.
    for spec in (tf.TensorSpec(x.shape), tf.TensorSpec((None, 9, 11, 16))):
        graph = tf.function(lambda t: layer(t)).get_concrete_function(spec).graph
        assert "BatchMatMulV2" in {op.type for op in graph.get_operations()}


@pytest.mark.parametrize("dtype, axis, tolerance", [
    ("float32", -1, 1e-5), ("mixed_float16", -1, 1e-2), ("float32", 1, 1e-5)])
def test_layer_norm_matches_keras_and_has_no_negation(dtype, axis, tolerance):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((2, 5, 16)) * 3 + 1).astype("float32")
    ours = layers.LayerNorm(axis=axis, epsilon=1e-6, dtype=dtype)
    theirs = keras.layers.LayerNormalization(axis=axis, epsilon=1e-6, dtype=dtype)
    ours.build(x.shape)
    theirs.build(x.shape)
    weights = [rng.standard_normal(w.shape) for w in ours.weights]
    ours.set_weights(weights)
    theirs.set_weights(weights)
    assert ours(x).dtype == theirs(x).dtype
    np.testing.assert_allclose(np.float32(ours(x)), np.float32(theirs(x)), atol=tolerance)
    graph = tf.function(lambda t: ours(t)).get_concrete_function(tf.TensorSpec(x.shape)).graph
    assert (axis != -1) == ("Neg" in {op.type for op in graph.get_operations()})


@pytest.mark.parametrize("shape, dtype", [((2, 9, 11, 16), "float32"), ((5, 48), "float32"),
                                          ((3, 7, 16), "mixed_float16")])
def test_layer_norm_as_the_onednn_kernel_gives_the_same_values(shape, dtype):
    rng = np.random.default_rng(5)
    norm = layers.LayerNorm(epsilon=1e-6, dtype=dtype)
    norm.build(shape)
    norm.set_weights([rng.standard_normal(w.shape) for w in norm.weights])
    x = tf.constant((rng.standard_normal(shape) * 3 + 1).astype("float32"))
    plain = tf.function(lambda t: norm(t))(x)
    with onednn_inference_kernels():
        eager = norm(x)  # eager calls keep the plain ops
        kernel = tf.function(lambda t: norm(t))
        graph = kernel.get_concrete_function(tf.TensorSpec(shape)).graph
        fused = kernel(x)
    assert [op.type for op in graph.get_operations()].count("_MklLayerNorm") == 1
    assert fused.shape == plain.shape and fused.dtype == plain.dtype
    tolerance = 1e-2 if dtype == "mixed_float16" else 1e-5
    np.testing.assert_allclose(np.float32(fused), np.float32(plain), atol=tolerance)
    np.testing.assert_allclose(np.float32(eager), np.float32(plain), atol=tolerance)


def test_locally_grouped_attention_is_local():
    """A change inside one 7x7 window leaves every other window's output alone."""
    layer = layers.LocallyGroupedSelfAttention(8, 2, window_size=7)
    x = np.random.default_rng(1).standard_normal((1, 14, 14, 8)).astype("float32")
    changed = x.copy()
    changed[0, 2, 3] += 1.0
    difference = np.abs(layer(changed) - layer(x)).max(axis=-1)[0]
    assert difference[:7, :7].max() > 0
    difference[:7, :7] = 0
    assert difference.max() == 0


def test_stochastic_depth_drops_whole_samples_only_in_training():
    layer = layers.StochasticDepth(0.5, seed=3)
    x = np.ones((400, 2, 2, 3), "float32")
    np.testing.assert_array_equal(layer(x, training=False), x)
    y = np.asarray(layer(x, training=True))
    per_sample = y.reshape(400, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert (per_sample.min(1) == per_sample.max(1)).all()
    assert 0.35 < (per_sample[:, 0] == 0).mean() < 0.65
    with pytest.raises(ValueError, match="Received: rate=1.0"):
        layers.StochasticDepth(1.0)


def test_mlp_trains_through_one_fused_gelu_with_the_same_values_and_gradients():
    mlp = layers.MLP(24, 96)
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(size=(2, 7, 24)).astype("float32"))
    upstream = tf.constant(rng.normal(size=(2, 7, 24)).astype("float32"))

    def outputs_and_gradients(training):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = mlp(x, training=training)
        return [y, *tape.gradient(y, [x, *mlp.trainable_variables], output_gradients=upstream)]

    for fused, keras_gelu in zip(outputs_and_gradients(True), outputs_and_gradients(False)):
        np.testing.assert_allclose(fused, keras_gelu, rtol=1e-5, atol=1e-5)
    graph = tf.function(lambda: outputs_and_gradients(True)).get_concrete_function().graph
    library = graph.as_graph_def().library.function
    assert sum(f.attr["_XlaMustCompile"].b for f in library) == 2  # value and gradient


BAD_CONSTRUCTIONS = [
    (lambda: layers.LocallyGroupedSelfAttention(16, 2, window_size=0),
     "`window_size` must be a positive integer. Received: window_size=0"),
    (lambda: layers.GlobalSubsampledAttention(16, 2, sr_ratio=0),
     "`sr_ratio` must be a positive integer. Received: sr_ratio=0"),
    (lambda: layers.GlobalSubsampledAttention(16, 0),
     "`num_heads` must be a positive integer. Received: num_heads=0"),
    (lambda: layers.TransformerBlock(16, 2, window_size=2.5),
     "`window_size` must be a positive integer. Received: window_size=2.5"),
    (lambda: layers.TransformerBlock(16, 2, window_size=0),
     "`window_size` must be a positive integer. Received: window_size=0"),
    (lambda: layers.PositionalEncodingGenerator(kernel_size=0),
     "`kernel_size` must be a positive integer. Received: kernel_size=0"),
]


@pytest.mark.parametrize("construct, message", BAD_CONSTRUCTIONS,
                         ids=[message.split("`")[1] for _, message in BAD_CONSTRUCTIONS])
def test_a_layer_refuses_an_impossible_argument_in_one_line(construct, message):
    with pytest.raises(ValueError) as error:
        construct()
    assert str(error.value) == message


BAD_INPUTS = [
    # Another channel count than `dim`: a MatMul error deep inside, before.
    (layers.LocallyGroupedSelfAttention(16, 2, window_size=7), (2, 9, 11, 8),
     "expected axis -1 of input shape to have value 16"),
    (layers.GlobalSubsampledAttention(16, 2, sr_ratio=2), (2, 9, 11, 8),
     "expected axis -1 of input shape to have value 16"),
    (layers.TransformerBlock(16, 2, window_size=7), (2, 9, 11, 8),
     "expected axis -1 of input shape to have value 16"),
    # A token sequence rather than a map: "not enough values to unpack", before.
    (layers.LocallyGroupedSelfAttention(16, 2, window_size=7), (2, 99, 16),
     "expected ndim=4, found ndim=3"),
    (layers.TransformerBlock(16, 2, sr_ratio=2), (2, 99, 16), "expected ndim=4, found ndim=3"),
    (layers.PositionalEncodingGenerator(), (2, 99, 16), "expected ndim=4, found ndim=3"),
    # A map smaller than the sub-sampling window.
    (layers.GlobalSubsampledAttention(16, 2, sr_ratio=8), (2, 4, 6, 16),
     "sub-samples by sr_ratio=8, so it takes maps of at least 8x8"),
]


@pytest.mark.parametrize("layer, shape, message", BAD_INPUTS,
                         ids=[f"{type(layer).__name__}-{shape}" for layer, shape, _ in BAD_INPUTS])
def test_a_layer_refuses_an_input_it_cannot_take_in_one_line(layer, shape, message):
    with pytest.raises(ValueError) as error:
        layer(np.zeros(shape, "float32"))
    assert message in str(error.value)
    assert len(str(error.value).splitlines()) == 1, str(error.value)


def test_a_built_map_layer_refuses_another_channel_count():
    """The PEG learns its channel count from the first input and then holds to it."""
    layer = layers.PositionalEncodingGenerator()
    layer(np.zeros((1, 5, 5, 16), "float32"))
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 16"):
        layer(np.zeros((1, 5, 5, 8), "float32"))


def test_a_model_built_after_set_random_seed_is_the_same_model():
    """The initial kernels are drawn with NumPy (a backend's random ops
    compiled for each kernel shape on JAX), from seeds that
    `keras.utils.set_random_seed` sets, as Keras' own initializers are."""
    def kernels():
        model = keras_twins.Twins(**TINY, input_shape=(32, 32, 3), classes=3)
        return [keras.ops.convert_to_numpy(v) for v in model.weights if "kernel" in v.path]

    keras.utils.set_random_seed(4)
    first, second = kernels(), kernels()
    keras.utils.set_random_seed(4)
    again = kernels()
    assert len(first) > 10 and all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not any(np.array_equal(a, b) for a, b in zip(first, second))
    # No two kernels of a model start alike, whatever their shapes.
    assert len({a.ravel()[:4].tobytes() for a in first}) == len(first)
