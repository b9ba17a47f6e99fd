"""Feature pyramids for dense prediction: P2..P5 at any size, with or without norms.

Parity of P2..P5 with timm's forward_intermediates is in test_parity.py.
"""

import re

import numpy as np
import pytest

import keras
import keras_twins
from conftest import TINY
from conftest import TINY_PCPVT


@pytest.mark.parametrize("config", [TINY, TINY_PCPVT], ids=["svt", "pcpvt"])
@pytest.mark.parametrize("size", [(512, 512), (600, 800), (800, 1333), (97, 131)])
def test_pyramid_levels_have_strides_4_to_32(config, size):
    backbone = keras_twins.Twins(**config, include_top=False, input_shape=(None, None, 3))
    extractor = keras.Model(backbone.inputs, backbone.pyramid_outputs)
    images = np.random.default_rng(0).uniform(0, 255, (1,) + size + (3,)).astype("float32")
    pyramid = extractor.predict(images, verbose=0)
    assert sorted(pyramid) == ["P2", "P3", "P4", "P5"]
    # Stage 1 embeds 4x4 patches, each later stage 2x2, each flooring its
    # input size as PyTorch's strided conv does: strides 4, 8, 16, 32.
    height, width = size[0] // 4, size[1] // 4
    for level, channels in zip(("P2", "P3", "P4", "P5"), config["embed_dims"]):
        assert pyramid[level].shape == (1, height, width, channels), level
        assert np.isfinite(pyramid[level]).all()
        height, width = height // 2, width // 2


def test_pyramid_norm_adds_a_norm_per_stage_and_keeps_loaded_weights(tmp_path):
    plain = keras_twins.Twins(**TINY, include_top=False, input_shape=(64, 96, 3))
    path = str(tmp_path / "backbone.weights.h5")
    plain.save_weights(path)
    normed = keras_twins.Twins(**TINY, include_top=False, input_shape=(64, 96, 3),
                               weights=path, pyramid_norm=True)
    names = [layer.name for layer in normed.layers if layer.name.startswith("pyramid_norm")]
    assert names == [f"pyramid_norm_{stage}" for stage in range(4)]
    assert normed.count_params() == plain.count_params() + 2 * sum(TINY["embed_dims"])
    for layer in (layer for layer in plain.layers if layer.weights):
        for a, b in zip(layer.get_weights(), normed.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(a, b)
    # Each level is its stage's normed map: zero mean and unit variance per token
    # (the norms start as gamma=1, beta=0).
    extractor = keras.Model(normed.inputs, normed.pyramid_outputs)
    images = np.random.default_rng(1).uniform(0, 255, (1, 64, 96, 3)).astype("float32")
    for level, feature_map in extractor.predict(images, verbose=0).items():
        np.testing.assert_allclose(feature_map.mean(-1), 0.0, atol=1e-4, err_msg=level)
        np.testing.assert_allclose(feature_map.std(-1), 1.0, atol=1e-2, err_msg=level)

    # A fine-tuned backbone's weights, norms included, load back into one with norms.
    for name in names:
        normed.get_layer(name).set_weights([w + 0.5 for w in normed.get_layer(name).get_weights()])
    for suffix in (".weights.h5", ".keras"):
        saved = str(tmp_path / f"normed{suffix}")
        normed.save_weights(saved) if suffix == ".weights.h5" else normed.save(saved)
        reloaded = keras_twins.Twins(**TINY, include_top=False, input_shape=(64, 96, 3),
                                     weights=saved, pyramid_norm=True)
        for a, b in zip(reloaded.weights, normed.weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=saved)
        with pytest.raises(ValueError, match="^" + re.escape(
                f"The weights file {saved} holds pyramid norms (its model was built with "
                "pyramid_norm=True); pass `pyramid_norm=True`") + "$"):
            keras_twins.Twins(**TINY, include_top=False, weights=saved)


def test_pyramid_outputs_are_found_again_after_saving(tmp_path):
    backbone = keras_twins.Twins(**TINY_PCPVT, include_top=False, input_shape=(64, 64, 3))
    path = tmp_path / "backbone.keras"
    backbone.save(path)
    loaded = keras.saving.load_model(path)
    images = np.random.default_rng(2).uniform(0, 255, (1, 64, 64, 3)).astype("float32")
    before = keras.Model(backbone.inputs, backbone.pyramid_outputs).predict(images, verbose=0)
    after = keras.Model(loaded.inputs, keras_twins.pyramid_outputs(loaded)).predict(
        images, verbose=0)
    for level in before:
        np.testing.assert_array_equal(before[level], after[level])

    other = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, name="dense")])
    with pytest.raises(ValueError, match="not a Twins model"):
        keras_twins.pyramid_outputs(other)
