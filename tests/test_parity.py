"""Numerical parity with timm, through the converter."""

import json
import os
import subprocess
import sys

import h5py
import keras
import numpy as np
import pytest

import keras_twins
from conftest import max_error_within_tolerance

# 97x131 makes LSA pad at every stage (maps 24x32, 12x16, 6x8, 3x4);
# neither non-square size is a multiple of 32.
SIZES = [(224, 224), (97, 131), (200, 264)]


def convert_with_cli(*jobs):
    """Runs `python -m weights_convert SOURCE --output OUTPUT` for each job, side by side."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "weights_convert", str(source), "--output", str(output)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for source, output in jobs
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
    return [output for _, output in jobs]


def assert_same_weights_file(first, second):
    """Both files hold the same datasets under the same names, bit for bit."""
    with h5py.File(first, "r") as a, h5py.File(second, "r") as b:
        names = []
        a.visititems(lambda name, item: names.append(name)
                     if isinstance(item, h5py.Dataset) else None)
        assert names
        for name in names:
            np.testing.assert_array_equal(a[name][()], b[name][()])
        count = []
        b.visititems(lambda name, item: count.append(name)
                     if isinstance(item, h5py.Dataset) else None)
        assert len(count) == len(names)


@pytest.mark.parametrize("variant", list(keras_twins.CONSTRUCTORS))
def test_logits_and_features_match_timm(variant, random_reference, tmp_path):
    import torch

    reference, directory = random_reference(variant)
    from_safetensors = tmp_path / "st.weights.h5"
    if variant.endswith("small"):
        # Both checkpoint formats give the same file, through the command.
        _, from_pth = convert_with_cli((directory / "model.safetensors", from_safetensors),
                                       (directory / "model.pth", tmp_path / "pth.weights.h5"))
        assert_same_weights_file(from_pth, from_safetensors)
    else:
        # The larger variants have the same keys at other widths: their
        # .safetensors is converted in this process (a new one spends 7 s
        # importing TensorFlow).
        from weights_convert.convert import convert

        convert(directory / "model.safetensors", from_safetensors)

    constructor = keras_twins.CONSTRUCTORS[variant]
    model = constructor(weights=str(from_safetensors), input_shape=(None, None, 3),
                        include_preprocessing=False, classifier_activation=None)
    features = constructor(weights=str(from_safetensors), include_top=False,
                           input_shape=(None, None, 3), include_preprocessing=False)

    def classify(images, first):
        # `predict`, what users run, at the first size. Called directly
        # otherwise: each new shape and model retraces predict's function, up
        # to 10 s for the large variants; the two agree to 1e-5 (test_model,
        # test_cpu_streams).
        if first:
            return model.predict(images, verbose=0)
        return np.asarray(model(images, training=False))

    # The final map and the feature pyramid from one pass of the backbone.
    extractor = keras.Model(features.input, [features.output, features.pyramid_outputs])
    # The variants of a family take the same code paths, so the larger ones
    # skip the third size, which costs them most.
    sizes = SIZES if variant.endswith("small") else SIZES[:2]
    rng = np.random.default_rng(0)
    for height, width in sizes:
        first = (height, width) == sizes[0]
        images = rng.standard_normal((2, 3, height, width)).astype(np.float32)
        with torch.no_grad():
            expected_features = reference.forward_features(torch.from_numpy(images))
            # timm's forward is exactly forward_head(forward_features(x)).
            expected_logits = reference.forward_head(expected_features).numpy()
            expected_features = expected_features.numpy()
        nhwc = images.transpose(0, 2, 3, 1)

        logits = classify(nhwc, first)
        ok, error, bound = max_error_within_tolerance(logits, expected_logits)
        assert ok, f"{variant} {height}x{width} logits: max|diff| {error:.3g} > {bound:.3g}"

        feature_map, pyramid = keras.tree.map_structure(
            np.asarray, extractor(nhwc, training=False))
        tokens = feature_map.reshape(2, -1, feature_map.shape[-1])
        ok, error, bound = max_error_within_tolerance(tokens, expected_features)
        assert ok, f"{variant} {height}x{width} features: max|diff| {error:.3g} > {bound:.3g}"
        if (height, width) != (97, 131):
            continue
        # The feature pyramid, at the size where every stage's map is non-square.
        with torch.no_grad():
            expected = reference.forward_intermediates(torch.from_numpy(images),
                                                       intermediates_only=True)
        assert sorted(pyramid) == ["P2", "P3", "P4", "P5"]
        for level, reference_map in zip(("P2", "P3", "P4", "P5"), expected):
            reference_map = reference_map.numpy().transpose(0, 2, 3, 1)
            assert pyramid[level].shape == reference_map.shape, level
            ok, error, bound = max_error_within_tolerance(pyramid[level], reference_map)
            assert ok, f"{variant} {level}: max|diff| {error:.3g} > {bound:.3g}"


def test_preprocessing_inside_the_model_matches_timm_normalization(random_reference):
    """include_preprocessing=True on [0, 255] pixels == timm on mean/std-normalized input."""
    import torch

    reference, directory = random_reference("twins_svt_small")
    model = keras_twins.TwinsSVTSmall(
        weights=str(directory / "model.safetensors"), classifier_activation=None,
        input_shape=(97, 131, 3),
    )
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 97, 131, 3)).astype(np.float32)
    mean = np.array(keras_twins.variants.IMAGENET_MEAN, np.float32)
    std = np.array(keras_twins.variants.IMAGENET_STD, np.float32)
    normalized = ((pixels / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    with torch.no_grad():
        expected = reference(torch.from_numpy(np.ascontiguousarray(normalized))).numpy()
    ok, error, bound = max_error_within_tolerance(model.predict(pixels, verbose=0), expected)
    assert ok, f"max|diff| {error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("channels", [1, 4])
def test_rgb_weights_for_other_channel_counts_give_timms_in_chans_logits(
        channels, random_reference, tmp_path):
    """`input_shape=(H, W, C)` with RGB weights adapts the first convolution
    as timm adapts pretrained weights for `in_chans` (`adapt_input_conv`):
    from a checkpoint (the converter's assignment) and from a Keras file (a
    copy from an RGB model), with the other weights as they are."""
    import timm
    import torch
    from timm.models import adapt_input_conv

    from weights_convert.convert import convert

    reference, directory = random_reference("twins_pcpvt_small")
    state_dict = reference.state_dict()
    stem = "patch_embeds.0.proj.weight"
    state_dict[stem] = adapt_input_conv(channels, state_dict[stem])
    adapted = timm.create_model("twins_pcpvt_small", pretrained=False, in_chans=channels)
    adapted.load_state_dict(state_dict)
    adapted.eval()
    images = np.random.default_rng(2).standard_normal((2, channels, 64, 96)).astype(np.float32)
    with torch.no_grad():
        expected = adapted(torch.from_numpy(images)).numpy()
    keras_file = tmp_path / "rgb.weights.h5"
    convert(directory / "model.safetensors", keras_file)
    for weights in (directory / "model.safetensors", keras_file):
        model = keras_twins.TwinsPCPVTSmall(weights=str(weights), classifier_activation=None,
                                            input_shape=(None, None, channels),
                                            include_preprocessing=False)
        logits = np.asarray(model(images.transpose(0, 2, 3, 1), training=False))
        ok, error, bound = max_error_within_tolerance(logits, expected)
        assert ok, f"{weights.name}, {channels} channels: max|diff| {error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("variant", ["twins_svt_small", "twins_pcpvt_small"])
def test_a_model_without_weights_starts_as_timms_does(variant):
    """Built without weights, each variable draws from the distribution that
    timm's `Twins._init_weights` gives its tensor, so training from scratch
    starts as the reference's does: the same quantiles to within sampling
    error, and the constant ones (biases, norms) equal. Keras' default,
    Glorot's uniform, gave the PEG's depthwise kernels a standard deviation
    of 0.06 where timm's is 0.47, and the first stage's attention kernels 4x
    to 6x timm's 0.02."""
    import timm
    import torch

    from weights_convert.mapping import reference_key

    torch.manual_seed(0)
    keras.utils.set_random_seed(0)
    reference = {key: tensor.numpy().astype(np.float64) for key, tensor
                 in timm.create_model(variant, pretrained=False).state_dict().items()}
    model = keras_twins.CONSTRUCTORS[variant](weights=None)
    compared = set()
    for variable in model.weights:
        key = reference_key(variable.path)
        if key not in reference:
            continue  # the preprocessing's mean and variance
        compared.add(key)
        ours = keras.ops.convert_to_numpy(variable).astype(np.float64).ravel()
        theirs, n = reference[key].ravel(), ours.size
        if theirs.std() == 0:
            np.testing.assert_array_equal(ours, theirs, err_msg=key)
            continue
        # Quantiles, not moments: timm's trunc_normal_ draws through erfinv,
        # and a float32 uniform draw of exactly +-1 lands on its +-2 cut, so
        # its large kernels hold a few values of 100 std (kurtosis 97, not 3).
        # A quantile's sampling error over n draws is below 2.1 std / sqrt(n)
        # for these; six of them, for two samples. A uniform of the same
        # spread is 0.19 std off at the quartiles, one cut at 2 std 0.08.
        quantiles = [0.05, 0.25, 0.5, 0.75, 0.95]
        ours, theirs = np.quantile(ours, quantiles), np.quantile(theirs, quantiles)
        spread = (theirs[3] - theirs[1]) / 1.349  # the standard deviation of a normal
        tolerance = 6 * np.sqrt(2) * 2.1 * spread / np.sqrt(n)
        assert np.abs(ours - theirs).max() < tolerance, (key, ours, theirs, tolerance)
    assert compared == set(reference)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_other_backends_give_timms_logits(backend, random_reference, tmp_path):
    """Both families' logits on Keras' JAX and PyTorch backends, from the
    converted weights, through `predict` and a direct call. On JAX, `predict`
    raised "predict_step() takes 2 positional arguments but 3 were given"
    (its trainer passes its state first)."""
    import torch

    from weights_convert.convert import convert

    cases = {}
    rng = np.random.default_rng(5)
    for variant in ("twins_svt_small", "twins_pcpvt_small"):
        reference, directory = random_reference(variant)
        weights = tmp_path / f"{variant}.weights.h5"
        convert(directory / "model.safetensors", weights)
        images = rng.standard_normal((2, 3, 97, 131)).astype(np.float32)
        with torch.no_grad():
            expected = reference(torch.from_numpy(images)).numpy()
        np.savez(tmp_path / f"{variant}.npz", images=images.transpose(0, 2, 3, 1),
                 expected=expected)
        cases[variant] = str(weights)
    script = tmp_path / "logits.py"
    script.write_text(f"""
import json
import keras
import numpy as np
import keras_twins
assert keras.backend.backend() == {backend!r}
errors = {{}}
for variant, weights in {cases!r}.items():
    arrays = np.load({str(tmp_path)!r} + f"/{{variant}}.npz")
    model = keras_twins.CONSTRUCTORS[variant](
        weights=weights, input_shape=(None, None, 3), include_preprocessing=False,
        classifier_activation=None)
    for how, logits in [("predict", model.predict(arrays["images"], verbose=0)),
                        ("call", keras.ops.convert_to_numpy(model(arrays["images"])))]:
        errors[f"{{variant}} {{how}}"] = float(np.abs(logits - arrays["expected"]).max())
print(json.dumps(errors))
""")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            env={**os.environ, "KERAS_BACKEND": backend}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(errors) == 4, errors
    for case, error in errors.items():
        expected = np.load(tmp_path / f"{case.split()[0]}.npz")["expected"]
        bound = 1e-5 * max(1.0, float(np.abs(expected).max()))
        assert error <= bound, f"{backend} {case}: max|diff| {error:.3g} > {bound:.3g}"
