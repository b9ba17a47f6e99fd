"""The builder and the six constructors: sizes, arguments, shapes, saving."""

import os
import re
import warnings

import h5py
import numpy as np
import pytest
import tensorflow as tf

import keras
import keras_twins
from keras_twins import variants
from keras_twins.model import _first_outside
from conftest import TINY
from conftest import TINY_PCPVT
from conftest import TWO_STAGES

EXPECTED_PARAMETERS = {
    keras_twins.TwinsPCPVTSmall: 24_106_216,
    keras_twins.TwinsPCPVTBase: 43_828_456,
    keras_twins.TwinsPCPVTLarge: 60_989_672,
    keras_twins.TwinsSVTSmall: 24_060_776,
    keras_twins.TwinsSVTBase: 56_070_952,
    keras_twins.TwinsSVTLarge: 99_271_400,
}


@pytest.mark.parametrize("constructor", list(EXPECTED_PARAMETERS), ids=lambda c: c.__name__)
def test_parameter_counts_are_exact(constructor):
    model = constructor()
    assert model.count_params() == EXPECTED_PARAMETERS[constructor]
    assert model.name == constructor().name  # deterministic default names
    assert model.output.shape == (None, 1000)


def test_variant_table_figures_agree_with_the_models():
    for constructor, expected in EXPECTED_PARAMETERS.items():
        assert keras_twins.VARIANTS[constructor().name]["params"] == expected


@pytest.mark.parametrize("config", [TINY, TINY_PCPVT], ids=["svt", "pcpvt"])
@pytest.mark.parametrize(
    "size", [(32, 32), (33, 47), (97, 131), (224, 224), (200, 264), (600, 800)])
def test_any_input_size(config, size):
    model = keras_twins.Twins(**config, classes=7, input_shape=size + (3,))
    images = np.random.default_rng(0).uniform(0, 255, (2,) + size + (3,)).astype("float32")
    probabilities = model.predict(images, verbose=0)
    assert probabilities.shape == (2, 7)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("config", [TINY, TINY_PCPVT], ids=["svt", "pcpvt"])
def test_static_input_shape_gives_an_all_static_graph(config):
    model = keras_twins.Twins(**config, input_shape=(97, 131, 3))
    for layer in model.layers:
        assert None not in layer.output.shape[1:], layer.name
    function = tf.function(lambda x: model(x, training=False))
    graph = function.get_concrete_function(tf.TensorSpec((1, 97, 131, 3))).graph
    dynamic = {op.type for op in graph.get_operations()} & {"Shape", "Pack", "Prod"}
    assert not dynamic, f"shape arithmetic at run time: {dynamic}"
    for op in graph.get_operations():
        for tensor in op.outputs:
            if tensor.dtype != tf.resource:
                assert tensor.shape.is_fully_defined(), (op.name, tensor.shape)


def test_dynamic_feature_extractor_with_pooling_at_several_sizes():
    model = keras_twins.Twins(**TINY, include_top=False, input_shape=(None, None, 3),
                              pooling="avg")
    maps = keras_twins.Twins(**TINY, include_top=False)
    assert maps.input.shape == (None, None, None, 3)
    for size in [(32, 32), (64, 96), (97, 131), (250, 180)]:
        images = np.random.default_rng(1).uniform(0, 255, (1,) + size + (3,)).astype("float32")
        assert model.predict(images, verbose=0).shape == (1, 32)
        assert maps.predict(images, verbose=0).shape == (1, size[0] // 32, size[1] // 32, 32)
    max_pooled = keras_twins.Twins(**TINY, include_top=False, pooling="max")
    assert max_pooled.output.shape == (None, 32)


@pytest.mark.parametrize("config", [TINY, TINY_PCPVT], ids=["svt", "pcpvt"])
def test_keras_file_round_trip_gives_identical_outputs(config, tmp_path):
    model = keras_twins.Twins(**config, classes=5, drop_path_rate=0.1,
                              input_shape=(None, None, 3))
    images = np.random.default_rng(2).uniform(0, 255, (2, 97, 131, 3)).astype("float32")
    expected = model.predict(images, verbose=0)
    model.save(tmp_path / "m.keras")
    restored = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(restored.predict(images, verbose=0), expected)
    assert restored.get_layer("stage_1_block_1").drop_path_rate == model.get_layer(
        "stage_1_block_1").drop_path_rate
    # Keras' legacy format: "Unknown layer: 'TwinsModel'" before.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "You are saving your model as an HDF5 file")
        model.save(tmp_path / "m.h5")
    legacy = keras.models.load_model(tmp_path / "m.h5")
    np.testing.assert_array_equal(legacy.predict(images, verbose=0), expected)


def test_models_stay_channels_last_when_keras_defaults_to_channels_first(
        tmp_path, channels_first_by_default):
    # Before, a keras.json with "channels_first" broke the build inside a
    # Conv2D ("Computed output size would be zero or negative"), and a model
    # saved in channels-last failed once loaded there (its normalization).
    images = np.random.default_rng(3).uniform(0, 255, (2, 64, 48, 3)).astype("float32")
    keras.config.set_image_data_format("channels_last")
    reference = keras_twins.Twins(**TINY, classes=5, input_shape=(None, None, 3))
    expected = reference.predict(images, verbose=0)
    reference.save(tmp_path / "m.keras")
    keras.config.set_image_data_format("channels_first")

    for pooling in ("avg", "max"):
        features = keras_twins.Twins(**TINY_PCPVT, include_top=False, pooling=pooling)
        assert features(images).shape == (2, TINY_PCPVT["embed_dims"][-1])
    model = keras_twins.Twins(**TINY, classes=5, input_shape=(None, None, 3))
    model.set_weights(reference.get_weights())
    np.testing.assert_allclose(model.predict(images, verbose=0), expected, atol=1e-6)
    restored = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(restored.predict(images, verbose=0), expected, atol=1e-6)
    segmentation = keras_twins.SemanticFPN(
        keras_twins.Twins(**TINY, include_top=False, input_shape=(None, None, 3)),
        num_classes=3, fpn_channels=8, head_channels=8)
    assert segmentation(images).shape == (2, 64, 48, 3)
    with pytest.raises(ValueError, match=r"at least 32x32 \(channels last, as Twins models "
                                         r"take them\); Received: input_shape=\(3, 64, 64\)"):
        keras_twins.Twins(**TINY, input_shape=(3, 64, 64))


def test_predict_and_evaluate_run_each_layer_norm_as_one_onednn_kernel():
    model = keras_twins.Twins(**TINY, classes=10)
    model.compile(loss="categorical_crossentropy", metrics=["accuracy"])
    norms = sum(isinstance(layer, keras_twins.layers.LayerNorm)
                for layer in model._flatten_layers())
    rng = np.random.default_rng(6)
    images = tf.constant(rng.uniform(0, 255, (3, 224, 224, 3)).astype("float32"))
    labels = tf.one_hot([1, 2, 3], 10)

    def kernels(step, *args):
        graph = tf.function(step).get_concrete_function(*args).graph
        return [op.type for op in graph.get_operations()].count("_MklLayerNorm")

    assert kernels(model.predict_step, images) == norms
    assert kernels(model.test_step, (images, labels)) == norms
    assert kernels(lambda x: model(x, training=False), images) == 0  # export traces this
    np.testing.assert_allclose(model.predict(images, verbose=0), model(images, training=False),
                               rtol=1e-5, atol=1e-7)
    loss = keras.losses.categorical_crossentropy(labels, model(images, training=False))
    np.testing.assert_allclose(model.evaluate(images, labels, verbose=0)[0],
                               float(tf.reduce_mean(loss)), rtol=1e-5)
    model.compile(loss="categorical_crossentropy", jit_compile=True)  # XLA has no such kernel
    assert kernels(model.predict_step, images) == 0
    assert kernels(model.test_step, (images, labels)) == 0


def test_weights_file_round_trip_with_and_without_head(tmp_path):
    model = keras_twins.Twins(**TINY, classes=5)
    model.save_weights(tmp_path / "tiny.weights.h5")
    images = np.random.default_rng(3).uniform(0, 255, (1, 224, 224, 3)).astype("float32")
    reloaded = keras_twins.Twins(**TINY, classes=5, weights=str(tmp_path / "tiny.weights.h5"))
    np.testing.assert_array_equal(reloaded.predict(images, verbose=0),
                                  model.predict(images, verbose=0))
    headless = keras_twins.Twins(**TINY, include_top=False,
                                 weights=str(tmp_path / "tiny.weights.h5"))
    np.testing.assert_array_equal(headless.get_layer("norm").gamma.numpy(),
                                  model.get_layer("norm").gamma.numpy())
    headless.save_weights(tmp_path / "headless.weights.h5")
    model.save(tmp_path / "tiny.keras")
    keras_twins.TwinsSVTSmall(include_top=False).save_weights(tmp_path / "svt.weights.h5")
    kernel = model.get_layer("stage_1_block_1").mlp.fc2.kernel
    kernel.assign(np.where(np.eye(*kernel.shape, dtype=bool), np.nan, kernel.numpy()))
    model.save_weights(tmp_path / "diverged.weights.h5")
    # A file that does not fit gets the one-line error and none of Keras' warnings.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Keras named one layer that did not fit; the file's architecture is
        # named, for a whole model saved by `model.save` too.
        for path in (tmp_path / "tiny.weights.h5", tmp_path / "tiny.keras"):
            with pytest.raises(ValueError, match=re.escape(
                    f"The weights file {path} holds the weights of a Twins-SVT with "
                    "embed_dims=(8, 16, 24, 32) and depths=(1, 2, 1, 2), not of "
                    "pcpvt_tiny") + "$"):
                keras_twins.Twins(**TINY_PCPVT, weights=str(path), name="pcpvt_tiny")
        for constructor, name in ((keras_twins.TwinsPCPVTSmall, "twins_pcpvt_small"),
                                  (keras_twins.TwinsSVTBase, "twins_svt_base")):
            with pytest.raises(ValueError, match=re.escape(
                    f"The weights file {tmp_path / 'svt.weights.h5'} holds the weights of "
                    f"twins_svt_small, not of {name}") + "$"):
                constructor(include_top=False, weights=str(tmp_path / "svt.weights.h5"))
        # Keras named a variable's shapes; a checkpoint's head is named so.
        with pytest.raises(ValueError, match=re.escape(
                "tiny.weights.h5 has a head of 5 classes; pass `classes=5`, or "
                "`include_top=False` to drop the head. Received: classes=10")):
            keras_twins.Twins(**TINY, classes=10, weights=str(tmp_path / "tiny.weights.h5"))
        with pytest.raises(ValueError, match=re.escape(
                "headless.weights.h5 has no classification head")):
            keras_twins.Twins(**TINY, classes=5, weights=str(tmp_path / "headless.weights.h5"))
        # A diverged run's weights loaded silently, and the model predicted NaN.
        with pytest.raises(ValueError, match=re.escape(
                "diverged.weights.h5: 'stage_1_block_1/mlp/fc2/kernel' holds 16 non-finite "
                "values (NaN or infinity): a damaged file, or one saved after training "
                "diverged") + "$"):
            keras_twins.Twins(**TINY, classes=5, weights=str(tmp_path / "diverged.weights.h5"))
    assert [str(warning.message) for warning in caught] == []


def test_the_weights_of_a_larger_model_give_its_twins_and_files_of_none_are_named(tmp_path):
    # The usual fine-tuning: a Twins without its head inside a model with a new one.
    backbone = keras_twins.Twins(**TINY, include_top=False, pooling="avg",
                                 input_shape=(64, 64, 3), name="backbone")
    inputs = keras.Input((64, 64, 3))
    finetuned = keras.Model(inputs, keras.layers.Dense(3, name="new_head")(backbone(inputs)))
    finetuned.save_weights(tmp_path / "finetuned.weights.h5")
    finetuned.save(tmp_path / "finetuned.keras")
    keras.Sequential([backbone, keras.layers.Dense(2)]).save_weights(tmp_path / "seq.weights.h5")
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2), keras.layers.Dense(1)]
                     ).save_weights(tmp_path / "dense.weights.h5")
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras' word that the format is legacy
        backbone.save(tmp_path / "legacy.h5")  # Keras 2's layout, matched by layer order
    legacy = keras_twins.Twins(**TINY, include_top=False, pooling="avg",
                               weights=str(tmp_path / "legacy.h5"))
    for a, b in zip(legacy.weights, backbone.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(ValueError, match="^Could not load the weights file .*legacy.h5"):
        keras_twins.Twins(**TINY_PCPVT, include_top=False, weights=str(tmp_path / "legacy.h5"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Keras said "A total of 53 objects could not be loaded", naming the final norm.
        for name in ("finetuned.weights.h5", "finetuned.keras", "seq.weights.h5"):
            loaded = keras_twins.Twins(**TINY, include_top=False, weights=str(tmp_path / name))
            for a, b in zip(loaded.weights, backbone.weights, strict=True):
                np.testing.assert_array_equal(a.numpy(), b.numpy())
        path = tmp_path / "finetuned.keras"
        with pytest.raises(ValueError, match="^" + re.escape(
                f"The weights file {path} holds the weights of a Twins-SVT with "
                "embed_dims=(8, 16, 24, 32) and depths=(1, 2, 1, 2) (inside a larger model), "
                "not of pcpvt_tiny") + "$"):
            keras_twins.Twins(**TINY_PCPVT, include_top=False, weights=str(path),
                              name="pcpvt_tiny")
        with pytest.raises(ValueError, match="^" + re.escape(
                f"The weights file {path} has no classification head")):
            keras_twins.Twins(**TINY, weights=str(path))
        with pytest.raises(ValueError, match="^" + re.escape(
                f"The weights file {tmp_path / 'dense.weights.h5'} holds no Twins model's "
                "weights: none of its 2 layers is a Twins or holds one") + "$"):
            keras_twins.Twins(**TINY, weights=str(tmp_path / "dense.weights.h5"))
        with pytest.raises(ValueError, match="^" + re.escape(
                f"The weights file {tmp_path / 'plain.h5'} holds no Keras model's weights") + "$"):
            keras_twins.Twins(**TINY, weights=str(tmp_path / "plain.h5"))
    assert [str(warning.message) for warning in caught] == []
    assert sorted(os.listdir(tmp_path)) == ["dense.weights.h5", "finetuned.keras",
                                            "finetuned.weights.h5", "legacy.h5", "plain.h5",
                                            "seq.weights.h5"]


def test_include_preprocessing_false_takes_normalized_input():
    with_preprocessing = keras_twins.Twins(**TINY, input_shape=(64, 64, 3))
    without = keras_twins.Twins(**TINY, input_shape=(64, 64, 3), include_preprocessing=False)
    without.set_weights(with_preprocessing.get_weights())
    pixels = np.random.default_rng(4).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    mean = np.array(keras_twins.variants.IMAGENET_MEAN) * 255
    std = np.array(keras_twins.variants.IMAGENET_STD) * 255
    np.testing.assert_allclose(
        without.predict(((pixels - mean) / std).astype("float32"), verbose=0),
        with_preprocessing.predict(pixels, verbose=0), atol=1e-6,
    )


def test_input_tensor_is_used():
    tensor = keras.Input(shape=(64, 80, 3))
    model = keras_twins.Twins(**TINY, include_top=False, input_tensor=tensor)
    assert model.inputs[0] is tensor
    assert model.output.shape == (None, 2, 2, 32)
    # Keras warned on every call that the inputs' structure differed from
    # the model's, a one-element list.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model(np.zeros((1, 64, 80, 3), "float32")).shape == (1, 2, 2, 32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(weights="nowhere/model.safetensors"),
     "No file at the `weights` path. The `weights` argument should be"),
    (dict(weights="nowhere/model.safetensors"), "Received: weights='nowhere/model.safetensors'"),
    (dict(weights=os.curdir), "`weights` names a folder"),
    (dict(weights=3), "Received: weights=3"),
    (dict(weights="imagenet", classes=10), "`classes` should be 1000. Received classes=10"),
    (dict(input_shape=(224, 224, None)),
     "channels (its last axis) must be a whole number of at least 1; Received `input_shape="
     "(224, 224, None)`"),
    (dict(input_shape=(224, 224, 0)), "Received `input_shape=(224, 224, 0)`"),
    (dict(input_shape=(31, 224, 3)), "at least 32x32; Received: input_shape=(31, 224, 3)"),
    (dict(input_shape=(224, 3)), "Received: input_shape=(224, 3)"),
    # A TypeError from tuple(), and ('2', '2', '4').
    (dict(input_shape=224), "must be (height, width, channels). Received: input_shape=224"),
    (dict(input_shape="224"), "Received: input_shape='224'"),
    # Keras' own error for a float size came from deep inside its variables.
    (dict(input_shape=(224.0, 224.0, 3)), "whole numbers (or None for any size)"),
    (dict(include_top=False, pooling="mean"), "Received: pooling='mean'"),
    # keras.Input's refusal printed the array over dozens of lines.
    (dict(input_tensor=np.zeros((1, 32, 32, 3))),
     "`input_tensor` must be a Keras tensor: keras.Input(...) or a layer's output. "
     "Received: input_tensor of type ndarray, shape (1, 32, 32, 3)"),
])
def test_argument_errors_name_the_argument_and_value(kwargs, message):
    with pytest.raises(ValueError) as error:
        keras_twins.TwinsSVTSmall(**kwargs)
    assert message in str(error.value)
    assert len(str(error.value).splitlines()) == 1


def test_imagenet_weights_only_for_the_six_variants():
    with pytest.raises(ValueError, match="Received: weights='imagenet'"):
        keras_twins.Twins(**TINY, weights="imagenet")


def test_a_model_of_other_channel_counts_normalizes_trains_and_saves(tmp_path):
    """`input_shape=(H, W, C)` for any C, as keras.applications takes it without
    ImageNet weights: one gray channel normalized by the averages of
    ImageNet's means and stds, more channels by R, G, B, R, ..., so that
    RGB weights (adapted as timm adapts them) see the same features."""
    mean, std = variants.IMAGENET_MEAN, variants.IMAGENET_STD
    rng = np.random.default_rng(0)
    for channels, (means, stds) in {1: ([sum(mean) / 3], [sum(std) / 3]),
                                    4: ([*mean, mean[0]], [*std, std[0]])}.items():
        model = keras_twins.Twins(**TINY, classes=3, input_shape=(None, None, channels))
        pixels = rng.uniform(0, 255, (2, 40, 48, channels)).astype(np.float32)
        inside = keras.Model(model.input, model.get_layer("preprocessing").output)
        np.testing.assert_allclose(inside(pixels), (pixels / 255 - means) / stds,
                                   rtol=1e-5, atol=1e-5)
        labels = np.array([0, 2])
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        loss = model.train_on_batch(pixels, labels)
        assert np.isfinite(loss)
        model.save(tmp_path / f"{channels}.keras")
        restored = keras.models.load_model(tmp_path / f"{channels}.keras")
        np.testing.assert_allclose(restored.predict(pixels, verbose=0),
                                   model.predict(pixels, verbose=0), atol=1e-6)
        with pytest.raises(ValueError, match=re.escape(
                f"takes images with {channels} channel{'s' * (channels > 1)} in the last axis. "
                "Received: "
                "inputs.shape=(2, 40, 48, 3)")):
            model.predict(pixels[..., :1].repeat(3, -1), verbose=0)

    # RGB weights for six channels that repeat the RGB image: the RGB model's
    # features (with pyramid norms, which the file lacks, as both load it).
    keras_twins.Twins(**TINY, classes=3).save_weights(tmp_path / "rgb.weights.h5")
    features = {}
    for channels in (3, 6):
        model = keras_twins.Twins(**TINY, classes=3, input_shape=(None, None, channels),
                                  weights=str(tmp_path / "rgb.weights.h5"), pyramid_norm=True)
        features[channels] = keras.Model(model.input, model.get_layer("norm").output)
    six = model
    pixels = rng.uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(features[6](np.concatenate([pixels, pixels], -1)),
                               features[3](pixels), rtol=1e-4, atol=1e-4)

    # Weights of a 1-channel model load into one, and into no other.
    six.save_weights(tmp_path / "six.weights.h5")
    gray = keras_twins.Twins(**TINY, classes=3, input_shape=(None, None, 1),
                             weights=str(tmp_path / "rgb.weights.h5"))
    gray.save_weights(tmp_path / "gray.weights.h5")
    again = keras_twins.Twins(**TINY, classes=3, input_shape=(None, None, 1),
                              weights=str(tmp_path / "gray.weights.h5"))
    for a, b in zip(gray.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)
    # Another architecture's weights are named as such, for the model built,
    # before their channels: RGB ones into a gray model, gray ones into RGB.
    for weights, channels in (("rgb", 1), ("gray", 3)):
        with pytest.raises(ValueError, match=r"holds the weights of a Twins-SVT with "
                                             r"embed_dims=\(8, 16, 24, 32\).*, not of "
                                             r"twins_svt_small$"):
            keras_twins.TwinsSVTSmall(weights=str(tmp_path / f"{weights}.weights.h5"),
                                      include_top=False, input_shape=(None, None, channels))
    for weights, channels in (("gray", 3), ("six", 1)):
        with pytest.raises(ValueError) as error:  # (six's file has pyramid norms)
            keras_twins.Twins(**TINY, classes=3, input_shape=(None, None, channels),
                              weights=str(tmp_path / f"{weights}.weights.h5"),
                              pyramid_norm=weights == "six")
        found = {"gray": 1, "six": 6}[weights]
        assert str(error.value) == (
            f"{tmp_path / weights}.weights.h5: its first convolution takes {found}-channel "
            f"images and twins takes {channels}; only RGB (3-channel) weights are adapted to "
            f"another count: build the model with input_shape=(H, W, {found})")


def test_a_grayscale_batch_is_refused_not_broadcast():
    """(H, W, 1) broadcast against the 3-channel normalization and ran."""
    model = keras_twins.Twins(**TINY, input_shape=(None, None, 3), classes=10)
    gray = np.zeros((2, 64, 64, 1), np.float32)
    for run in (model, lambda x: model.predict(x, verbose=0)):
        with pytest.raises(ValueError, match=re.escape("3 (RGB) channels")) as error:
            run(gray)
        assert "\n" not in str(error.value)  # called, Keras printed every pixel under it


def test_a_batch_in_a_list_or_dict_of_one_is_checked_and_images_in_a_list_named():
    """Keras takes a list or dict of one input for the input itself: a gray
    batch in one ran, broadcast. A list of images, not stacked into a batch,
    was "expects 1 named input(s) ... but it received 2 input tensors"."""
    model = keras_twins.Twins(**TINY, input_shape=(None, None, 3), classes=10)
    gray = np.zeros((2, 64, 64, 1), np.float32)
    for wrapped in ([gray], (gray,), {"images": gray}):
        for run in (model, lambda x: model.predict(x, verbose=0)):
            with pytest.raises(ValueError, match=re.escape("3 (RGB) channels")):
                run(wrapped)
    images = [np.zeros((64, 64, 3), np.float32)] * 2
    for run in (model, lambda x: model.predict(x, verbose=0)):
        with pytest.raises(ValueError, match=re.escape(
                "takes a batch of images as one array, (batch, height, width, 3); stack "
                "them (np.stack(images)). Received: a list of 2 arrays of shape (64, 64, 3)")):
            run(images)
    assert model.predict(np.stack(images), verbose=0).shape == (2, 10)  # as the error says


def test_the_one_batch_methods_refuse_as_fit_does():
    """train_on_batch and kin: a gray batch for a model of fixed size failed
    in the graph, and a label outside the classes raised 41 lines."""
    model = keras_twins.Twins(**TINY, input_shape=(32, 32, 3), classes=3)
    model.compile("adam", "sparse_categorical_crossentropy")
    images = np.zeros((4, 32, 32, 3), np.float32)
    labels = np.array([0, 1, 2, 0])
    for run, message in [
        (lambda: model.train_on_batch(images[..., :1], labels), "3 (RGB) channels"),
        (lambda: model.predict_on_batch(images[..., :1]), "3 (RGB) channels"),
        (lambda: model.train_on_batch(images, labels + 1), "Received: a label of 3"),
        (lambda: model.test_on_batch(images, labels - 1), "Received: a label of -1"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)) as error:
            run()
        assert "\n" not in str(error.value)
    assert np.isfinite(model.train_on_batch(images, labels))


def test_one_image_without_its_batch_axis_is_named():
    """Keras' error for an (H, W, 3) image printed its pixels and named no batch axis."""
    model = keras_twins.Twins(**TINY, input_shape=(None, None, 3), classes=10)
    image = np.zeros((64, 64, 3), np.float32)
    for run in (model, lambda x: model.predict(x, verbose=0)):
        with pytest.raises(ValueError, match=re.escape("add the batch axis (image[None]). "
                                                       "Received: inputs.shape=(")) as error:
            run(image)
        assert "\n" not in str(error.value)
    assert model(image[None]).shape == (1, 10)


def test_a_batch_too_small_is_refused_in_one_line_after_other_sizes():
    """Once `predict` had run two sizes, Keras traced its step for any size,
    and a 16x16 batch failed as the graph ran (a 67-line error). Called
    directly, the model's refusal came wrapped with every pixel printed."""
    model = keras_twins.Twins(**TINY, input_shape=(None, None, 3), classes=3)
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    for size in ((32, 32), (40, 48)):
        model.predict(np.zeros((1, *size, 3), "float32"), verbose=0)
    small = np.zeros((2, 16, 16, 3), "float32")
    dataset = tf.data.Dataset.from_tensor_slices((small, np.eye(3)[:2])).batch(2)
    for run in (model, lambda x: model.predict(x, verbose=0),
                lambda x: model.predict(dataset, verbose=0),
                lambda x: model.evaluate(dataset, verbose=0),
                lambda x: model.fit(dataset, verbose=0)):
        with pytest.raises(ValueError) as error:
            run(small)
        assert re.fullmatch(r"`twins` takes images of at least 32x32 pixels. "
                            r"Received: inputs.shape=\((2|None), 16, 16, 3\)", str(error.value))


@pytest.mark.parametrize("data", ["arrays", "tf.data"])
def test_fit_and_evaluate_trace_their_step_once(data):
    """Without a distribution strategy Keras created the optimizer's and the
    metrics' variables inside the first trace, and TensorFlow then traced
    the whole step again: twice the wait before the first step."""
    traces = {"train_step": 0, "test_step": 0}

    def counted(model, name):
        step = getattr(model, name)

        def traced(*args, **kwargs):
            traces[name] += 1
            return step(*args, **kwargs)

        setattr(model, name, traced)

    images = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    labels = np.arange(8) % 3
    kwargs = (dict(x=images, y=labels, batch_size=4) if data == "arrays" else
              dict(x=tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)))
    for run in ("fit", "evaluate"):
        model = keras_twins.Twins(**TINY, input_shape=(32, 32, 3), classes=3)
        model.compile(optimizer="adamw", loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        counted(model, "train_step")
        counted(model, "test_step")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            getattr(model, run)(**kwargs, verbose=0)
        # Keras' default `shuffle=True` does not warn that a pipeline ignores it.
        about_shuffle = [str(w.message) for w in caught if "shuffle" in str(w.message)]
        assert not about_shuffle, about_shuffle
    # fit traced its training step once; evaluate, on a fresh model, its test step.
    assert traces == {"train_step": 1, "test_step": 1}


@pytest.mark.parametrize("run, bad, message", [
    ("predict", (40, 44, 4), "takes images with 3 (RGB) channels in the last axis"),
    ("evaluate", (40, 20, 3), "takes images of at least 32x32 pixels")])
def test_a_pipeline_of_unknown_sizes_is_refused_in_one_line_as_it_runs(run, bad, message):
    """A `tf.data` pipeline of images of any size gives the step no height,
    width or channels to check as it is traced; its second batch, too small
    or of four channels, failed deep in the graph with a 75-line trace."""
    def images():
        yield np.zeros((36, 40, bad[2]), "float32")[..., :3], 0
        yield np.zeros(bad, "float32"), 1

    data = tf.data.Dataset.from_generator(images, output_signature=(
        tf.TensorSpec((None, None, None)), tf.TensorSpec((), tf.int32))).batch(1)
    model = keras_twins.Twins(**TINY, input_shape=(None, None, 3), classes=3, name="tiny")
    model.compile(loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError) as raised:
        getattr(model, run)(data, verbose=0)
    assert str(raised.value) == f"`tiny` {message}. Received: inputs.shape={(1, *bad)}"


@pytest.mark.parametrize("run, unknown", [("fit", "labels"), ("evaluate", "images")])
def test_a_pipeline_of_unknown_rank_is_refused_in_one_line(run, unknown):
    """Keras' fit and evaluate cannot take one: "as_list() is not defined on
    an unknown TensorShape", or "Cannot take the length of shape with
    unknown rank". predict can, and still does."""
    def examples():
        for label in (0, 1):
            yield np.zeros((32, 32, 3), "float32"), label

    specs = {"images": tf.TensorSpec((None, None, 3)), "labels": tf.TensorSpec((), tf.int32)}
    specs[unknown] = tf.TensorSpec(None, specs[unknown].dtype)
    # Of known length: Keras' predict warned that a generator "ran out of data".
    data = tf.data.Dataset.from_generator(examples, output_signature=(
        specs["images"], specs["labels"])).batch(2).apply(
            tf.data.experimental.assert_cardinality(1))
    model = keras_twins.Twins(**TWO_STAGES, input_shape=(None, None, 3), classes=2,
                              name="tiny")
    model.compile(loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError) as raised:
        getattr(model, run)(data, verbose=0)
    assert str(raised.value) == (
        f"`tiny` cannot fit or evaluate a pipeline whose {unknown} have a shape of unknown "
        "rank: give them one, as from_generator's output_signature=(tf.TensorSpec((None, "
        "None, 3)), tf.TensorSpec((), tf.int32)) does, or map tf.ensure_shape over the "
        "pipeline")
    assert model.predict(data.map(lambda images, labels: images), verbose=0).shape == (2, 2)


@pytest.mark.parametrize("run, data, label", [("fit", "arrays", 3), ("evaluate", "tf.data", -1)])
def test_a_label_outside_the_classes_is_refused_in_one_line(run, data, label):
    """TensorFlow's sparse cross-entropy found it as the step ran, with the
    graph's 47-line trace; a loss told to ignore it still takes it."""
    images = np.zeros((4, 32, 32, 3), "float32")
    labels = np.array([0, 1, label, 2])
    kwargs = (dict(x=images, y=labels, batch_size=2) if data == "arrays" else
              dict(x=tf.data.Dataset.from_tensor_slices((images, labels)).batch(2)))
    model = keras_twins.Twins(**TINY, input_shape=(32, 32, 3), classes=3, name="tiny")
    model.compile(optimizer="adamw", loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError) as raised:
        getattr(model, run)(**kwargs, verbose=0)
    assert str(raised.value) == ("`tiny` has 3 classes, so its labels are class indices from "
                                 f"0 to 2. Received: a label of {label}")
    if run == "evaluate":
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(ignore_class=label))
        assert np.isfinite(model.evaluate(**kwargs, verbose=0))


def test_labels_outside_the_classes_are_refused_before_a_step_runs():
    """Arrays of labels are checked before any step, on every backend, so
    validation labels outside the classes stop `fit` before its first epoch,
    not after it; a loss's ignored class is named, and huge masks are read
    in chunks. (On JAX and torch, see test_training's backend test.)"""
    images = np.zeros((4, 32, 32, 3), "float32")
    model = keras_twins.Twins(**TINY, input_shape=(32, 32, 3), classes=3, name="tiny")
    model.compile(optimizer="adamw", loss=keras.losses.SparseCategoricalCrossentropy(
        ignore_class=255))
    before = [v.numpy() for v in model.trainable_variables]
    for labels, label in [([0, 255, 1, 2], 4), ([0, 1, 2, 2], -3)]:
        validation = (images, np.array([labels[0], labels[1], label, labels[3]]))
        with pytest.raises(ValueError) as raised:
            model.fit(images, np.array(labels), validation_data=validation, verbose=0)
        assert str(raised.value) == (
            "`tiny` has 3 classes, so its labels are class indices from 0 to 2 (or 255, "
            f"which its loss ignores). Received: a label of {label}")
    assert all(np.array_equal(v.numpy(), b) for v, b in zip(model.trainable_variables, before))
    masks = np.zeros((3, 1024, 1024), np.uint8)
    masks[2, -1, -1], masks[1, 5] = 9, 255
    assert _first_outside(masks, 3, 255, chunk=1000) == 9
    assert _first_outside(masks[:2], 3, 255, chunk=1000) is None
    assert _first_outside(np.array([0.0, np.nan, 2.0, 3.0]), 3, None) == 3


@pytest.mark.parametrize("architecture, smallest", [
    (TINY, 32),
    (dict(TINY, patch_size=8), 64),
    # SVT's first block in a stage is LSA: a stage of one block sub-samples nothing.
    (TWO_STAGES, 16),
    (dict(TWO_STAGES, window_sizes=None), 32),
])
def test_the_smallest_input_follows_the_architecture(architecture, smallest):
    """Every stage keeps a token after its sub-sampling; one pixel less is refused
    by name, at build time and when a model of any size is called."""
    model = keras_twins.Twins(**architecture, input_shape=(smallest, smallest + 5, 3), classes=3)
    assert model.predict(np.zeros((1, smallest, smallest + 5, 3)), verbose=0).shape == (1, 3)
    with pytest.raises(ValueError, match=f"at least {smallest}x{smallest}; "):
        keras_twins.Twins(**architecture, input_shape=(smallest - 1, 224, 3))
    any_size = keras_twins.Twins(**architecture, input_shape=(None, None, 3), classes=3)
    small = np.zeros((1, 224, smallest - 1, 3), np.float32)
    for run in (any_size, lambda x: any_size.predict(x, verbose=0)):
        with pytest.raises(ValueError, match=f"at least {smallest}x{smallest} pixels"):
            run(small)


@pytest.mark.parametrize("change, message", [
    (dict(depths=(1, 2)), "Received: depths=(1, 2)"),
    (dict(num_heads=(3, 2, 3, 4)), "multiple of its `num_heads`"),
    # Each of these failed deep inside a layer (IndexError, ZeroDivisionError,
    # TypeError) or built a model with no meaning.
    (dict(embed_dims=16), "Received: embed_dims=16"),
    (dict(embed_dims="wide"), "Received: embed_dims='wide'"),
    (dict(depths=(1, -1, 1, 2)), "Received: depths=(1, -1, 1, 2)"),
    (dict(depths=(1, 1.5, 1, 2)), "Received: depths=(1, 1.5, 1, 2)"),
    (dict(num_heads=(0, 2, 3, 4)), "Received: num_heads=(0, 2, 3, 4)"),
    (dict(mlp_ratios=(0, 2, 2, 2)), "Received: mlp_ratios=(0, 2, 2, 2)"),
    (dict(sr_ratios=(0, 4, 2, 1)), "Received: sr_ratios=(0, 4, 2, 1)"),
    (dict(window_sizes=(0, 7, 7, 7)), "Received: window_sizes=(0, 7, 7, 7)"),
    (dict(classes=0), "Received: classes=0"),
    (dict(drop_path_rate=1.5), "Received: drop_path_rate=1.5"),
])
def test_config_errors_name_the_argument_and_value(change, message):
    with pytest.raises(ValueError) as error:
        keras_twins.Twins(**{**TINY, **change})
    assert message in str(error.value)
