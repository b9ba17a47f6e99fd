"""Every exported file, run in its own runtime, against the Keras model."""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys

import keras
import numpy as np
import tensorflow as tf
import pytest
from PIL import Image

import keras_twins
from conftest import TINY
from conftest import TINY_PCPVT
from conftest import TWO_STAGES
from conftest import run_cli
from conftest import write_oversized_png
from keras_twins.export import FLOAT_IN_MIXED_INT8
from keras_twins.export import ExportError
from keras_twins.export import LabelsWarning
from keras_twins.export import SkippedImagesWarning
from keras_twins.export import class_names
from keras_twins.export import export
from keras_twins.export import read_tflite_metadata
from keras_twins.export import tflite_report
from keras_twins.imagenet import imagenet_classes

# Listed here, not imported, so a change to the library's own list cannot weaken the test.
SHAPE_ARITHMETIC = {"SHAPE", "GATHER", "GATHER_ND", "REDUCE_PROD", "PACK"}


def run_tflite(path, images):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], images)
    interpreter.invoke()
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]), ops


def _case(variant, size, directory):
    """A real variant (random weights) and its Keras output at a size."""
    model = keras_twins.CONSTRUCTORS[variant](input_shape=(None, None, 3))
    images = np.random.default_rng(0).uniform(0, 255, (1,) + size + (3,)).astype(np.float32)
    return model, size, images, model.predict(images, verbose=0), directory


# SVT-S at the size it ships at, PCPVT-S at one where every map is padded or
# floored (24x32, 12x16, 6x8, 3x4). Each case costs about four minutes on CI,
# so the other two pairings, which take no other code path, are left out.
@pytest.fixture(scope="module")
def svt_224(tmp_path_factory):
    return _case("twins_svt_small", (224, 224), tmp_path_factory.mktemp("svt"))


@pytest.fixture(scope="module")
def pcpvt_97x131(tmp_path_factory):
    return _case("twins_pcpvt_small", (97, 131), tmp_path_factory.mktemp("pcpvt"))


@pytest.fixture
def case(request):
    """The module's case named by the test's parameter, built once for all its tests."""
    return request.getfixturevalue(request.param)


BOTH_CASES = pytest.mark.parametrize("case", ["svt_224", "pcpvt_97x131"], indirect=True)


def float32_file(case):
    """The case's float32 TFLite file, exported once for the tests that need it."""
    model, size, _, _, directory = case
    path = directory / "model.tflite"
    if not path.exists():
        export(model, path, image_size=size)
    return path


@BOTH_CASES
def test_tflite_float32_matches_with_builtin_static_ops(case):
    model, size, images, expected, directory = case
    path = float32_file(case)
    output, ops = run_tflite(path, images)
    assert np.abs(output - expected).max() <= 1e-5
    assert not ops & SHAPE_ARITHMETIC, ops & SHAPE_ARITHMETIC
    assert not {op for op in ops if op.startswith("FLEX") or op == "CUSTOM"}
    # Read by Python: TensorFlow's reader failed on a name that is not UTF-8.
    latin1 = os.fsdecode(os.path.join(os.fsencode(directory), b"mod\xe8le.tflite"))
    shutil.copy(path, latin1)
    report = tflite_report(latin1)
    assert report["flex_or_custom"] == [] and report["shape_arithmetic"] == []
    assert "compatible with GPU delegate" in report["gpu_compatibility"]
    labels = (directory / "labels.txt").read_text().splitlines()
    assert labels == [name for _, name in imagenet_classes()]
    metadata = read_tflite_metadata(latin1)
    assert metadata["labels.txt"].decode().splitlines() == labels
    contract = json.loads(metadata["input_contract.json"])
    assert contract["range"] == [0, 255] and contract["shape"] == [1, *size, 3]


# float16 is a converter setting over the float32 graph that both cases test;
# the SavedModel serves the graph `predict` runs. One case each.
@pytest.mark.parametrize("case", ["pcpvt_97x131"], indirect=True)
def test_tflite_float16_is_close_and_about_half_the_size(case):
    model, size, images, expected, directory = case
    float16 = export(model, directory / "f16.tflite", image_size=size, quantize="float16")
    output, _ = run_tflite(float16, images)
    assert np.abs(output - expected).max() <= 1e-2
    assert os.path.getsize(float16) <= 0.55 * os.path.getsize(float32_file(case))


@BOTH_CASES
def test_tflite_full_integer_int8_runs_and_is_under_a_third(case, calibration_images):
    model, size, images, _, directory = case
    int8 = export(model, directory / "int8.tflite", image_size=size, quantize="int8",
                  representative_data=calibration_images)
    output, _ = run_tflite(int8, images)
    assert output.shape == (1, 1000) and np.isfinite(output).all()
    assert os.path.getsize(int8) <= 0.3 * os.path.getsize(float32_file(case))
    report = tflite_report(str(int8))
    assert set(report["float_ops"]) == {"DEQUANTIZE"}
    # Attention products as FULLY_CONNECTED, whose int8 kernel is the fast one;
    # their PACK packs data, not sizes.
    assert "BATCH_MATMUL" not in report["ops"] and "PACK" in report["ops"]
    assert report["shape_arithmetic"] == []


@pytest.mark.parametrize("architecture", [TINY, TINY_PCPVT], ids=["svt", "pcpvt"])
def test_one_key_attention_stays_integer(architecture, calibration_images, tmp_path):
    """At 32x32 every GSA block has one key, whose weight is exactly 1: the
    converter dropped the key, and the SPLIT that made it stayed float32."""
    model = keras_twins.Twins(**architecture, input_shape=(None, None, 3), classes=10)
    images = np.random.default_rng(5).uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    float32, _ = run_tflite(export(model, tmp_path / "f32.tflite", image_size=32), images)
    assert np.abs(float32 - model.predict(images, verbose=0)).max() <= 1e-5
    int8 = export(model, tmp_path / "int8.tflite", image_size=32, quantize="int8",
                  representative_data=calibration_images)
    output, _ = run_tflite(int8, images)
    assert output.shape == (1, 10) and np.isfinite(output).all()
    assert tflite_report(str(int8))["float_ops"] == ["DEQUANTIZE"]


def test_report_counts_a_pack_of_sizes_as_shape_arithmetic(tmp_path):
    @tf.function(input_signature=[tf.TensorSpec((None, 4), tf.float32)])
    def regroup(x):
        return tf.reshape(x, tf.stack([tf.shape(x)[0], 2, 2]))

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [regroup.get_concrete_function()], regroup)
    path = tmp_path / "dynamic.tflite"
    path.write_bytes(converter.convert())
    assert {"SHAPE", "PACK"} <= set(tflite_report(str(path))["shape_arithmetic"])


@BOTH_CASES
def test_onnx_matches(case):
    import onnxruntime

    model, size, images, expected, directory = case
    path = export(model, directory / "model.onnx", format="onnx", image_size=size)
    session = onnxruntime.InferenceSession(str(path))
    output = session.run(None, {session.get_inputs()[0].name: images})[0]
    assert np.abs(output - expected).max() <= 1e-5


@pytest.mark.parametrize("case", ["svt_224"], indirect=True)
def test_saved_model_serving_signature_matches(case):
    import tensorflow as tf

    model, size, images, expected, directory = case
    path = export(model, directory / "saved_model", format="saved_model", image_size=size)
    loaded = tf.saved_model.load(str(path))
    (output,) = loaded.signatures["serving_default"](images=tf.constant(images)).values()
    assert np.abs(output.numpy() - expected).max() <= 1e-5
    # As Keras' export has them: the endpoint as an attribute, and the weights.
    assert np.abs(loaded.serving_default(images).numpy() - expected).max() <= 1e-5
    assert len(loaded.trainable_variables) == len(model.trainable_weights)
    assert loaded.non_trainable_variables == []
    assert (sorted(float(np.sum(v.numpy())) for v in loaded.variables)
            == sorted(float(np.sum(w.numpy())) for w in model.trainable_weights))


def test_each_export_traces_the_model_once(calibration_images, tmp_path):
    """Keras' ExportArchive traced it three times: an SVT-S SavedModel took
    14-19 s to write instead of 4-5 s, a float32 TFLite file 32 s instead of 16."""
    traces = []

    class Traced(keras.layers.Layer):
        def call(self, x):
            traces.append(x.shape)
            return x

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(Traced()(keras.layers.Rescaling(1 / 255)(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(x))
    for name, kwargs in [("saved", dict(format="saved_model")), ("f.tflite", {}),
                         ("i.tflite", dict(quantize="int8",
                                           representative_data=calibration_images))]:
        traces.clear()
        export(model, tmp_path / name, **kwargs)
        assert traces == [(1, 32, 32, 3)], (name, traces)


def test_onnx_optimizes_without_copying_the_graph_unless_an_optimizer_fails(tmp_path,
                                                                            monkeypatch):
    """tf2onnx copied the graph before each of its 36 optimizer runs, in case
    one failed: 17 of SVT-S's 63 s. A failure still falls back to the copies."""
    import onnxruntime
    from tf2onnx import optimizer

    optimize_graph, calls = optimizer.optimize_graph, []

    def recorded(graph, catch_errors=True, **kwargs):
        calls.append(catch_errors)
        if not catch_errors and fail:
            raise RuntimeError("an optimizer failed")
        return optimize_graph(graph, catch_errors, **kwargs)

    monkeypatch.setattr(optimizer, "optimize_graph", recorded)
    model = keras_twins.Twins(**TINY, input_shape=(None, None, 3), classes=10)
    images = np.random.default_rng(0).uniform(0, 255, (1, 64, 64, 3)).astype(np.float32)
    for fail, expected in [(False, [False]), (True, [False, True])]:
        calls.clear()
        path = export(model, tmp_path / f"{fail}.onnx", format="onnx", image_size=64)
        assert calls == expected
        session = onnxruntime.InferenceSession(str(path))
        output = session.run(None, {session.get_inputs()[0].name: images})[0]
        assert np.abs(output - model.predict(images, verbose=0)).max() <= 1e-5
    assert "TF2ONNX_CATCH_ERRORS" not in os.environ


def test_saved_model_and_onnx_take_any_batch_with_batch_size_none(tmp_path):
    """A fixed batch of 1 was the only choice: a server that batches requests
    could not use the files; a TFLite file keeps its fixed batch."""
    import onnxruntime

    model = keras_twins.Twins(**TINY, input_shape=(None, None, 3), classes=10)
    onnx = export(model, tmp_path / "any.onnx", format="onnx", image_size=(64, 80),
                  batch_size=None)
    saved = export(model, tmp_path / "any", format="saved_model", image_size=(64, 80),
                   batch_size=None)
    session = onnxruntime.InferenceSession(str(onnx))
    assert session.get_inputs()[0].shape == ["batch", 64, 80, 3]
    serving = tf.saved_model.load(str(saved)).signatures["serving_default"]
    for batch in (1, 3):
        images = np.random.default_rng(batch).uniform(0, 255, (batch, 64, 80, 3)).astype(
            np.float32)
        expected = model.predict(images, verbose=0)
        output = session.run(None, {session.get_inputs()[0].name: images})[0]
        assert np.abs(output - expected).max() <= 1e-5
        (output,) = serving(images=tf.constant(images)).values()
        assert np.abs(output.numpy() - expected).max() <= 1e-5
    with pytest.raises(ExportError, match=re.escape(
            "a TFLite file takes a fixed batch")):
        export(model, tmp_path / "any.tflite", image_size=(64, 80), batch_size=None)
    assert not (tmp_path / "any.tflite").exists()


# Keras' own tf2onnx patch tests for np.object, which NumPy 2 warns about.
@pytest.mark.filterwarnings("ignore:In the future `np.object`:FutureWarning")
def test_keras_own_onnx_export_converts_the_gelu(tmp_path):
    """Keras' `model.export(format="onnx")` wrote a file that onnxruntime
    refused: tf2onnx maps the exact GELU's Erfc to no ONNX op. keras_twins
    registers the conversion on import, for a Twins under a new head too."""
    import onnxruntime

    twins = keras_twins.Twins(**TINY, input_shape=(64, 64, 3), classes=5)
    backbone = keras_twins.Twins(**TINY_PCPVT, include_top=False, pooling="avg",
                                 input_shape=(64, 64, 3))
    inputs = keras.Input((64, 64, 3))
    finetuned = keras.Model(inputs, keras.layers.Dense(3)(backbone(inputs)))
    images = np.random.default_rng(8).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    for name, model in (("twins", twins), ("finetuned", finetuned)):
        expected = model.predict(images, verbose=0)  # Keras exports only a model called once
        path = str(tmp_path / f"{name}.onnx")
        model.export(path, format="onnx", verbose=False)
        session = onnxruntime.InferenceSession(path)
        output = session.run(None, {session.get_inputs()[0].name: images})[0]
        assert np.abs(output - expected).max() <= 1e-5, name


def test_logits_output(tmp_path):
    model = keras_twins.Twins(**TINY_PCPVT, classes=10)
    images = np.random.default_rng(3).uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
    path = export(model, tmp_path / "logits.tflite", output="logits", batch_size=2)
    logits, _ = run_tflite(path, images)
    probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert np.abs(probabilities - model.predict(images, verbose=0)).max() <= 1e-5


@pytest.fixture(scope="module")
def calibration_images(tmp_path_factory):
    directory = tmp_path_factory.mktemp("calibration")
    rng = np.random.default_rng(1)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(
            directory / f"{i}.png")
    return directory


def test_int8_mixed_and_dynamic_files_run_and_shrink(calibration_images, tmp_path):
    """float16 and full-integer int8 are checked on the real variants (`case`)."""
    keras.utils.set_random_seed(0)
    # Wide enough (2.4M parameters) that the weights, not the graph, set the size.
    model = keras_twins.Twins(**{**TINY, "embed_dims": (64, 128, 192, 256),
                                 "num_heads": (1, 2, 3, 4)}, classes=10)
    images = np.random.default_rng(2).uniform(0, 255, (1, 224, 224, 3)).astype(np.float32)
    expected = model.predict(images, verbose=0)
    float32 = export(model, tmp_path / "f32.tflite")
    mixed = export(model, tmp_path / "mixed.tflite", quantize="int8-mixed",
                   representative_data=calibration_images)
    output, _ = run_tflite(mixed, images)
    print("int8-mixed max|diff| from Keras:", np.abs(output - expected).max())
    assert np.abs(output - expected).max() <= 0.05
    assert os.path.getsize(mixed) <= 0.3 * os.path.getsize(float32)
    # Float only where XNNPACK has no int8 kernel; the linear layers are int8.
    float_ops = set(tflite_report(str(mixed))["float_ops"])
    assert {"BATCH_MATMUL", "SOFTMAX", "GELU"} <= float_ops
    assert float_ops <= set(FLOAT_IN_MIXED_INT8) | {"DEQUANTIZE"}
    dynamic = export(model, tmp_path / "dynamic.tflite", quantize="dynamic")
    assert run_tflite(dynamic, images)[0].shape == (1, 10)


def test_models_of_other_channel_counts_export(calibration_images, tmp_path, capfd):
    """A grayscale model (`input_shape=(H, W, 1)`) exports to float32 and
    full-integer TFLite, calibrated on the folder's images made gray, and to
    ONNX, from Python and the command; its input contract says so. A model of
    4 channels exports in float, and int8, whose calibration reads image
    files, is refused in one line."""
    import onnxruntime

    rng = np.random.default_rng(4)
    gray = keras_twins.Twins(**TINY, input_shape=(None, None, 1), classes=10)
    images = rng.uniform(0, 255, (1, 64, 64, 1)).astype(np.float32)
    expected = gray.predict(images, verbose=0)
    float32 = export(gray, tmp_path / "gray.tflite", image_size=64)
    assert np.abs(run_tflite(float32, images)[0] - expected).max() <= 1e-5
    contract = json.loads(read_tflite_metadata(str(float32))["input_contract.json"])
    assert contract["shape"] == [1, 64, 64, 1] and contract["color"] == "grayscale"
    int8 = export(gray, tmp_path / "gray_int8.tflite", image_size=64, quantize="int8",
                  representative_data=calibration_images)
    output, _ = run_tflite(int8, images)
    assert output.shape == (1, 10) and np.isfinite(output).all()
    assert tflite_report(str(int8))["float_ops"] == ["DEQUANTIZE"]
    onnx = export(gray, tmp_path / "gray.onnx", format="onnx", image_size=64)
    session = onnxruntime.InferenceSession(str(onnx))
    output = session.run(None, {session.get_inputs()[0].name: images})[0]
    assert np.abs(output - expected).max() <= 1e-5
    gray.save(tmp_path / "gray.keras")
    code, out, err = run_cli(capfd, "export", "--model", tmp_path / "gray.keras", "--format",
                             "tflite", "--output", tmp_path / "cli.tflite", "--image-size", "64")
    assert code == 0, err
    assert "input 1x64x64x1 float32 grayscale in [0, 255]" in out

    four = keras_twins.Twins(**TINY, input_shape=(None, None, 4), classes=10)
    images = rng.uniform(0, 255, (1, 32, 48, 4)).astype(np.float32)
    path = export(four, tmp_path / "four.tflite", image_size=(32, 48))
    assert np.abs(run_tflite(path, images)[0] - four.predict(images, verbose=0)).max() <= 1e-5
    with pytest.raises(ExportError) as error:
        export(four, tmp_path / "four_int8.tflite", quantize="int8",
               representative_data=calibration_images)
    assert str(error.value) == (
        "int8 calibration reads image files as RGB or grayscale, and the model takes "
        "4-channel images: export it in float32, float16 or with quantize='dynamic'")
    assert not (tmp_path / "four_int8.tflite").exists()


def test_int8_with_a_fixed_batch_of_three(calibration_images, tmp_path):
    """Calibration feeds whole batches: the fixed-shape graph takes no other size.

    An unreadable file in the folder is left out with a warning, as in training.
    """
    model = keras_twins.Twins(**TINY, classes=10, input_shape=(None, None, 3))
    images = np.random.default_rng(5).uniform(0, 255, (3, 64, 96, 3)).astype(np.float32)
    folder = tmp_path / "calibration"
    shutil.copytree(calibration_images, folder)
    (folder / "broken.jpg").write_text("not an image")
    with pytest.warns(SkippedImagesWarning, match="broken.jpg"):
        path = export(model, tmp_path / "int8.tflite", quantize="int8", batch_size=3,
                      image_size=(64, 96), representative_data=folder)
    output, _ = run_tflite(path, images)
    assert output.shape == (3, 10) and np.isfinite(output).all()
    assert "BATCH_MATMUL" not in tflite_report(str(path))["ops"]
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    with pytest.raises(ExportError, match="none of its image files could be read"):
        export(model, tmp_path / "none.tflite", quantize="int8", representative_data=unreadable)
    assert sorted(os.listdir(tmp_path)) == ["calibration", "int8.tflite", "labels.txt",
                                            "unreadable"]


def test_a_size_below_the_models_smallest_is_refused_before_converting(tmp_path):
    """The smallest size follows the architecture: 64 with 8-pixel patches."""
    model = keras_twins.Twins(**TINY, patch_size=8, input_shape=(None, None, 3), classes=10)
    with pytest.raises(ExportError, match=re.escape("at least 64x64 with a batch of at least 1. "
                                                    "Received: image_size=(48, 64)")):
        export(model, tmp_path / "small.tflite", image_size=(48, 64))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(format="coreml"), "Received: format='coreml'"),
    (dict(quantize="int4"), "Received: quantize='int4'"),
    (dict(quantize="int8", representative_data="/no/such/folder"),
     "/no/such/folder: no such folder"),
    (dict(quantize="int8", representative_data=__file__), f"{__file__}: not a folder"),
    (dict(format="onnx", quantize="float16"), "TFLite only"),
    (dict(image_size=(16, 224)), "at least 32x32"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(image_size=(64, 96)), "takes 224x224 images"),
    (dict(image_size=(224, 224, 3)), "Received: image_size=(224, 224, 3)"),
    (dict(batch_size=2.5), "Received: batch_size=2.5"),
    (dict(labels=["cat", "dog"]), "`labels` must be 10 class names"),
    (dict(labels=[f"class\n{i}" for i in range(10)]), "each a non-empty line"),
])
def test_bad_export_arguments_leave_no_file(kwargs, message, tmp_path):
    model = keras_twins.Twins(**TINY, classes=10)
    with pytest.raises(ExportError, match=re.escape(message)):
        export(model, tmp_path / "model.out", **kwargs)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ExportError, match="not writable|does not exist"):
        export(model, tmp_path / "missing" / "model.tflite")


def test_a_labels_txt_of_other_classes_is_not_replaced(tmp_path):
    """An export into a training run's folder replaced the run's labels.txt
    with another model's names, and the run's model then named the wrong
    classes."""
    model = keras_twins.Twins(**TINY, classes=2, input_shape=(32, 32, 3))
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    with pytest.raises(ExportError, match=re.escape(
            f"{tmp_path / 'labels.txt'} names other classes (2 names: cat, dog)")):
        export(model, tmp_path / "model.tflite", labels=["ant", "bee"])
    assert sorted(os.listdir(tmp_path)) == ["labels.txt"]
    assert (tmp_path / "labels.txt").read_text() == "cat\ndog\n"
    # The same names, as when a run's own model is exported into its folder.
    export(model, tmp_path / "model.tflite", labels=["cat", "dog"])
    export(model, tmp_path / "again.tflite", labels=["cat", "dog"])
    assert (tmp_path / "labels.txt").read_text() == "cat\ndog\n"


def test_class_names_come_from_the_training_run_of_a_keras_file(tmp_path):
    model = keras_twins.Twins(**TINY, classes=3)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert class_names(model, run / "model.keras") == ["class_0", "class_1", "class_2"]
    (run / "labels.txt").write_text("ant\nbee\ncow\n")
    # Not a run folder without run.json: an export writes labels.txt too.
    assert class_names(model, run / "model.keras") == ["class_0", "class_1", "class_2"]
    (run / "run.json").write_text("{}")
    assert class_names(model, run / "model.keras") == ["ant", "bee", "cow"]
    assert class_names(model, run / "checkpoints" / "best.keras") == ["ant", "bee", "cow"]
    assert class_names(model) == ["class_0", "class_1", "class_2"]
    # A labels.txt one folder up is not the run's, but for checkpoints/.
    (run / "other").mkdir()
    assert class_names(model, run / "other" / "m.keras") == ["class_0", "class_1", "class_2"]
    # A labels.txt of another run (another class count) is not used.
    (run / "labels.txt").write_text("ant\nbee\n")
    with pytest.warns(LabelsWarning, match="2 names for 3 outputs"):
        assert class_names(model, run / "model.keras") == ["class_0", "class_1", "class_2"]
    imagenet = keras_twins.Twins(**TINY)
    assert class_names(imagenet)[:2] == [name for _, name in imagenet_classes()[:2]]


def test_a_bad_model_or_path_is_named(tmp_path):
    """A TypeError from os.fspath and an AttributeError from inside before."""
    with pytest.raises(ExportError, match="Received: path=None"):
        export(keras_twins.Twins(**TINY, classes=10), None)
    with pytest.raises(ExportError, match="must be a Keras model. Received: str"):
        export("model.keras", tmp_path / "model.tflite")
    assert os.listdir(tmp_path) == []


def test_an_output_path_that_names_other_things_loses_nothing(tmp_path):
    """A folder is replaced only by a SavedModel, and only an empty one or a SavedModel."""
    import tensorflow as tf

    model = keras_twins.Twins(**TINY, classes=10)
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"keep me")
    for format in ("tflite", "onnx"):
        with pytest.raises(ExportError, match="is a folder"):
            export(model, folder, format=format)
    with pytest.raises(ExportError, match="not a SavedModel folder"):
        export(model, folder, format="saved_model")
    keep = tmp_path / "notes.txt"
    keep.write_text("keep me")
    with pytest.raises(ExportError, match="is a file"):
        export(model, keep, format="saved_model")
    # A file of another kind was overwritten: a run's model.keras, say.
    keras_file = tmp_path / "model.keras"
    keras_file.write_bytes(b"the trained model")
    for path, format in [(keep, "tflite"), (keras_file, "onnx")]:
        with pytest.raises(ExportError, match=f"exists and is not a .{format} file"):
            export(model, path, format=format)
    keras_file.unlink()
    for path, format, named in [("model.onnx", "tflite", "onnx"),
                                ("model.tflite", "onnx", "tflite"),
                                ("saved.tflite", "saved_model", "tflite")]:
        with pytest.raises(ExportError, match=f"pass format='{named}'"):
            export(model, tmp_path / path, format=format)
    # TensorFlow's SavedModel writer failed on a name that is not UTF-8.
    latin1 = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"mod\xe8le"))
    with pytest.raises(ExportError, match=re.escape(
            "mod\\xe8le: TensorFlow writes only to UTF-8 paths, and this one is not UTF-8")):
        export(model, latin1, format="saved_model")
    assert (folder / "cat.jpg").read_bytes() == b"keep me" and keep.read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "photos"]

    # A SavedModel is replaced by the new one, with nothing left beside it.
    saved = tmp_path / "saved"
    export(model, saved, format="saved_model")
    (saved / "stale.txt").write_text("from the first export")
    export(model, str(saved) + os.sep, format="saved_model")
    assert not (saved / "stale.txt").exists()
    assert "serving_default" in tf.saved_model.load(str(saved)).signatures
    assert sorted(os.listdir(tmp_path)) == ["labels.txt", "notes.txt", "photos", "saved"]


def test_cli_export_writes_a_file_and_reports(tmp_path, capfd):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({**TINY, "classes": 10}))
    output = tmp_path / "tiny.tflite"
    # The installed command once, as a user runs it; the other cases in this
    # process (each new process spends 7 s of CPU importing TensorFlow).
    result = subprocess.run(
        [sys.executable, "-m", "keras_twins", "export", "--model", str(config),
         "--weights", "none", "--format", "tflite", "--output", str(output),
         "--image-size", "97", "131"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "GPU delegate" in result.stdout and "1x97x131x3" in result.stdout
    outputs, _ = run_tflite(output, np.zeros((1, 97, 131, 3), np.float32))
    assert outputs.shape == (1, 10)
    code, out, err = run_cli(capfd, "export", "--model", config, "--weights", "none",
                             "--format", "saved_model", "-o", tmp_path / "any",
                             "--batch-size", "any")
    assert code == 0, err
    assert "input Nx224x224x3" in out
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "labels.txt").write_text("cat\ndog\n")
    for bad, named in [(["--format", "coreml"], "coreml"),
                       (["--format", "tflite", "--quantize", "int8"], "representative_data"),
                       (["--format", "tflite", "--image-size", "16"], "at least 32x32"),
                       (["--format", "tflite", "--image-size", "64", "64", "3"], "H or H W"),
                       (["--format", "onnx", "--output", str(tmp_path)], "is a folder"),
                       (["--format", "tflite", "--batch-size", "all"], "a number or 'any'"),
                       (["--format", "tflite", "--batch-size", "any"], "fixed batch"),
                       (["--format", "onnx", "--output", str(tmp_path / "run" / "m.onnx")],
                        "run/labels.txt names other classes (2 names: cat, dog)")]:
        code, out, err = run_cli(capfd, "export", "--model", config, "--weights", "none",
                                 "--output", tmp_path / "bad.tflite", *bad)
        assert code != 0
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], lines
        assert not (tmp_path / "bad.tflite").exists()
    assert config.exists() and output.exists()
    assert os.listdir(tmp_path / "run") == ["labels.txt"]


def test_probabilities_from_a_head_without_softmax(tmp_path):
    """classifier_activation=None: the "probabilities" file gave its logits."""
    from keras_twins.model import classifier_outputs

    model = keras_twins.Twins(**TINY, input_shape=(32, 32, 3), classes=3,
                              classifier_activation=None)
    assert classifier_outputs(model) == "logits"
    assert classifier_outputs(keras_twins.Twins(**TINY, input_shape=(32, 32, 3))) == (
        "probabilities")
    for pooling in (None, "avg"):
        assert classifier_outputs(keras_twins.Twins(**TINY, input_shape=(32, 32, 3),
                                                    include_top=False, pooling=pooling)) is None
    images = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    expected = keras.ops.softmax(model(images)).numpy()
    for output in ("probabilities", "logits"):
        path = export(model, tmp_path / f"{output}.tflite", output=output)
        outputs, _ = run_tflite(path, images)
        np.testing.assert_allclose(outputs, expected if output == "probabilities"
                                   else model(images).numpy(), atol=1e-5)


def test_a_model_without_preprocessing_is_given_normalized_pixels(tmp_path, capsys):
    """include_preprocessing=False: the model takes timm's normalized input.
    predict and evaluate gave it [0, 255] pixels, and its exported files
    took normalized input while their metadata said [0, 255] pixels."""
    from keras_twins import cli
    from keras_twins import training
    from keras_twins.model import takes_pixels

    pixels = keras_twins.Twins(**TINY, input_shape=(32, 32, 3), classes=3)
    bare = keras_twins.Twins(**TINY, input_shape=(32, 32, 3), classes=3,
                             include_preprocessing=False)
    bare.set_weights(pixels.get_weights())
    assert takes_pixels(pixels) and not takes_pixels(bare)
    # A model of the user's around the bare one: its own first layer decides.
    inputs = keras.Input((32, 32, 3))
    assert not takes_pixels(keras.Model(inputs, keras.layers.Dense(2)(bare(inputs))))
    assert takes_pixels(keras.Sequential([inputs, keras.layers.Rescaling(1 / 127.5, -1), bare]))
    assert not takes_pixels(keras_twins.SemanticFPN(
        keras_twins.Twins(**TINY, include_top=False, include_preprocessing=False), 2))
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    expected = pixels.predict(images, verbose=0)
    assert np.abs(bare.predict(images, verbose=0) - expected).max() > 1e-3
    for format in ("tflite", "onnx"):
        path = export(bare, tmp_path / f"bare.{format}", format=format, batch_size=2)
        if format == "tflite":
            output, _ = run_tflite(path, images)
        else:
            import onnxruntime

            session = onnxruntime.InferenceSession(str(path))
            output = session.run(None, {session.get_inputs()[0].name: images})[0]
        assert np.abs(output - expected).max() <= 1e-5, format
    # The command and evaluate: a folder of PNGs, scored by both models.
    data = tmp_path / "data" / "validation"
    for i, label in enumerate("abc"):
        (data / label).mkdir(parents=True)
        Image.fromarray(images[i % 2].astype(np.uint8)).save(data / label / "0.png")
    scores, shown = {}, {}
    for name, model in (("pixels", pixels), ("bare", bare)):
        model.save(tmp_path / f"{name}.keras")
        scores[name] = training.evaluate(tmp_path / "data", tmp_path / f"{name}.keras",
                                         verbose=0)
        assert cli.main(["predict", "--json", "--model", str(tmp_path / f"{name}.keras"),
                         str(data / "a" / "0.png")]) == 0
        shown[name] = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert scores["bare"]["loss"] == pytest.approx(scores["pixels"]["loss"], abs=1e-5)
    assert [p["class_id"] for p in shown["bare"]] == [p["class_id"] for p in shown["pixels"]]
    assert [p["probability"] for p in shown["bare"]] == pytest.approx(
        [p["probability"] for p in shown["pixels"]], abs=1e-5)


def test_a_mixed_precision_model_exports_as_its_float32_model(tmp_path):
    """As trained with --mixed-precision: TFLite's converter refused the
    half-precision graph, and the ONNX file did not load in onnxruntime."""
    import onnxruntime

    @contextlib.contextmanager
    def built_under(policy):
        keras.config.set_dtype_policy(policy)
        try:
            yield
        finally:
            keras.config.set_dtype_policy("float32")

    images = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    for policy, suffix in (("mixed_float16", "tflite"), ("mixed_bfloat16", "onnx")):
        with built_under(policy):
            mixed = keras_twins.Twins(**TINY, input_shape=(32, 32, 3), classes=3)
        model = keras_twins.Twins(**TINY, input_shape=(32, 32, 3), classes=3)
        model.set_weights(mixed.get_weights())
        path = export(mixed, tmp_path / f"model.{suffix}", format=suffix)
        if suffix == "tflite":
            outputs, _ = run_tflite(path, images)
        else:
            session = onnxruntime.InferenceSession(str(path))
            outputs = session.run(None, {session.get_inputs()[0].name: images})[0]
        np.testing.assert_allclose(outputs, model.predict(images, verbose=0), atol=1e-5)
        assert mixed.get_layer("stage_1_block_1").dtype_policy.name == policy  # left as it was

    class Unregistered(keras.layers.Layer):
        def call(self, x):
            return x

    with built_under("mixed_float16"):
        inputs = keras.Input((32, 32, 3))
        outputs = keras.layers.Dense(3, activation="softmax", dtype="float32", name="head")(
            keras.layers.GlobalAveragePooling2D()(Unregistered()(inputs)))
    with pytest.raises(ExportError, match=r"^the model computes in mixed precision and its "
                       r"float32 copy could not be built from its config: Could not locate "
                       r"class 'Unregistered'\. [^\n]*$"):
        export(keras.Model(inputs, outputs), tmp_path / "custom.tflite")
    assert not (tmp_path / "custom.tflite").exists()


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_a_model_quantized_by_keras_saves_loads_and_exports(policy, tmp_path):
    """`model.quantize("int8")` stopped at an unbuilt drop path; once past it,
    the saved model did not load (the blocks rebuilt float Dense layers), and
    an ONNX file of logits multiplied by the int8 kernel without its scale."""
    import onnxruntime

    keras.config.set_dtype_policy(policy)
    try:
        model = keras_twins.Twins(**TINY, input_shape=(32, 32, 3), classes=3)
    finally:
        keras.config.set_dtype_policy("float32")
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    before = model.predict(images, verbose=0)
    with pytest.warns(UserWarning, match="does not have a `quantize` method"):
        model.quantize("int8")  # Keras warns of each kind of layer it leaves as it is
    after = model.predict(images, verbose=0)
    assert model.get_layer("stage_1_block_1").mlp.fc1.quantization_mode == "int8"
    assert 0 < np.abs(after - before).max() < 0.05

    model.save(tmp_path / "int8.keras")
    loaded = keras.models.load_model(tmp_path / "int8.keras")
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), after)
    assert loaded.get_layer("stage_1_block_1").mlp.fc1.quantization_mode == "int8"

    logits = keras.Model(model.input, model.get_layer("head").output)  # softmax's input...
    logits.get_layer("head").activation = keras.activations.linear  # ...computed here
    expected = logits.predict(images, verbose=0)
    logits.get_layer("head").activation = keras.activations.softmax
    path = export(loaded, tmp_path / "logits.onnx", format="onnx", output="logits",
                  batch_size=None)
    session = onnxruntime.InferenceSession(str(path))
    outputs = session.run(None, {session.get_inputs()[0].name: images})[0]
    np.testing.assert_allclose(outputs, expected, atol=1e-4 if policy == "float32" else 0.02)
    with pytest.raises(ExportError, match=r"^`model` has layers quantized by `model.quantize` "
                       r"\(int8\), which the TFLite converter cannot take: export the float"):
        export(loaded, tmp_path / "int8.tflite")
    assert not (tmp_path / "int8.tflite").exists()


def test_cli_export_takes_the_smallest_size_of_the_model(tmp_path, capsys):
    """--image-size was refused under 32 whatever the model."""
    from keras_twins import cli

    two_stages = tmp_path / "two_stages.json"
    two_stages.write_text(json.dumps(TWO_STAGES))
    patch_8 = tmp_path / "patch_8.json"
    patch_8.write_text(json.dumps(dict(TINY, patch_size=8)))
    common = ["export", "--weights", "none", "--format", "tflite"]
    assert cli.main([*common, "--model", str(two_stages), "--image-size", "16",
                     "--output", str(tmp_path / "two.tflite")]) == 0, capsys.readouterr().err
    outputs, _ = run_tflite(tmp_path / "two.tflite", np.zeros((1, 16, 16, 3), np.float32))
    assert outputs.shape == (1, 1000)
    capsys.readouterr()
    assert cli.main([*common, "--model", str(patch_8), "--image-size", "48",
                     "--output", str(tmp_path / "p8.tflite")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "at least 64x64" in err and err.count("\n") == 1, err
    assert not (tmp_path / "p8.tflite").exists()


def test_calibration_draws_from_every_class_folder(tmp_path):
    """The first `limit` sorted files came from the first classes only."""
    from keras_twins.export import _calibration

    colors = {"a": (255, 0, 0), "b": (0, 255, 0), "c": (0, 0, 255)}
    for label, color in colors.items():
        (tmp_path / label).mkdir()
        for i in range(10):
            Image.new("RGB", (40, 40), color).save(tmp_path / label / f"{i}.png")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (40, 40), (9, 9, 9)).save(tmp_path / ".ipynb_checkpoints" / "x.png")
    write_oversized_png(tmp_path / "a" / "00_huge.png")  # skipped, as unreadable
    spec = tf.TensorSpec((1, 32, 32, 3), tf.float32)
    with pytest.warns(SkippedImagesWarning, match="00_huge.png"):
        samples = _calibration(tmp_path, spec, limit=6)
    drawn = [tuple(batch[0][0, 16, 16].astype(int)) for batch in samples()]
    assert len(drawn) == 6
    assert sorted(set(drawn)) == sorted(colors.values())
