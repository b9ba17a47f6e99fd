"""SemanticFPN: shapes at any size, training to mean IoU >= 0.8, builtin-only TFLite."""

import re

import numpy as np
import pytest
import tensorflow as tf

import keras
import keras_twins
from conftest import TINY
from conftest import TINY_PCPVT
from conftest import TWO_STAGES
from keras_twins.export import export
from keras_twins.export import tflite_report
from keras_twins.segmentation import IGNORE_LABEL
from keras_twins.segmentation import SemanticFPN
from keras_twins.segmentation import compile_for_segmentation
from keras_twins.segmentation import synthetic_shapes

SMALL_HEAD = dict(fpn_channels=32, head_channels=16)


@pytest.mark.parametrize("config", [TINY, TINY_PCPVT], ids=["svt", "pcpvt"])
@pytest.mark.parametrize("size", [(97, 131), (64, 64), (None, None)])
def test_logits_have_the_input_size(config, size):
    backbone = keras_twins.Twins(**config, include_top=False, input_shape=size + (3,))
    model = keras_twins.SemanticFPN(backbone, num_classes=5, **SMALL_HEAD)
    for height, width in ([size] if size[0] else [(97, 131), (120, 80)]):
        images = np.random.default_rng(0).uniform(0, 255, (2, height, width, 3))
        logits = model.predict(images.astype("float32"), verbose=0)
        assert logits.shape == (2, height, width, 5)
        assert np.isfinite(logits).all()


def test_bad_arguments_get_clear_errors():
    backbone = keras_twins.Twins(**TINY, include_top=False, input_shape=(64, 64, 3))
    for bad in (0, "3", 2.5):  # "3" was a TypeError from a comparison
        with pytest.raises(ValueError, match=f"Received: num_classes={bad!r}"):
            SemanticFPN(backbone, num_classes=bad)
    other = keras.Sequential([keras.Input((64, 64, 3)), keras.layers.Conv2D(4, 3, name="c")])
    with pytest.raises(ValueError, match="not a Twins model"):
        SemanticFPN(other, num_classes=3)
    # An AttributeError from inside.
    with pytest.raises(ValueError, match="Expected a Twins model.*Received: 'twins_svt_small'"):
        SemanticFPN("twins_svt_small", num_classes=3)
    # Keras' errors named its layers' `filters` and `rate`, not these arguments.
    for arg, bad in (("fpn_channels", 0), ("head_channels", -1), ("dropout", 2.0),
                     ("dropout", "0.1")):
        with pytest.raises(ValueError, match=re.escape(f"Received: {arg}={bad!r}")):
            SemanticFPN(backbone, num_classes=3, **{arg: bad})


def test_a_batch_it_cannot_take_is_refused_in_one_line(tmp_path):
    # Both failed inside a convolution of the backbone (a 16x16 image in a
    # stage's sub-sampling, a grayscale one in an Add) of an any-size model.
    backbone = keras_twins.Twins(**TINY, include_top=False, input_shape=(None, None, 3))
    model = SemanticFPN(backbone, num_classes=3, **SMALL_HEAD)
    path = tmp_path / "fpn.keras"
    model.save(path)
    model.save(tmp_path / "fpn.h5")  # Keras' legacy format: "Unknown layer" before
    for model in (model, keras.models.load_model(path),
                  keras.models.load_model(tmp_path / "fpn.h5")):
        with pytest.raises(ValueError, match=r"at least 32x32 pixels. Received: "
                                             r"inputs.shape=\(2, 16, 40, 3\)"):
            model.predict(np.zeros((2, 16, 40, 3), "float32"), verbose=0)
        with pytest.raises(ValueError, match=r"3 \(RGB\) channels") as error:
            model(np.zeros((1, 64, 64, 1), "float32"))
        assert "\n" not in str(error.value)  # Keras printed every pixel under it
        assert model(np.zeros((1, 32, 40, 3), "float32")).shape == (1, 32, 40, 3)


def test_masks_of_another_size_than_their_images_are_refused_in_one_line():
    """They failed in the loss, with the graph's trace (43 lines)."""
    # Two stages: each model's first step is traced, and this traces four.
    backbone = keras_twins.Twins(**TWO_STAGES, include_top=False,
                                 input_shape=(None, None, 3))
    model = compile_for_segmentation(SemanticFPN(backbone, num_classes=3, **SMALL_HEAD))
    images, masks = synthetic_shapes(4, (64, 96))
    small = masks[:, :32, :48]
    message = re.escape("`semantic_fpn` classifies each pixel: its masks are (batch, height, "
                        "width) class indices, of the same height and width as the images. "
                        "Received: masks.shape=")

    def any_size():  # sizes known only as each step runs
        for image, mask in zip(images, small):
            yield image, mask

    pipeline = tf.data.Dataset.from_generator(any_size, output_signature=(
        tf.TensorSpec((None, None, 3)), tf.TensorSpec((None, None), tf.uint8))).batch(2)
    for run in (lambda: model.fit(images, small, batch_size=2, verbose=0),
                lambda: model.evaluate(images, small, batch_size=2, verbose=0),
                lambda: model.train_on_batch(images, small),
                lambda: model.fit(tf.data.Dataset.from_tensor_slices((images, small)).batch(2),
                                  verbose=0),
                lambda: model.fit(pipeline, verbose=0),
                lambda: model.evaluate(pipeline, verbose=0)):
        with pytest.raises(ValueError, match=message + r"\((4|2|None), 32, 48\)") as error:
            run()
        assert "\n" not in str(error.value)
    # A channel axis of 1 fits the sparse loss, and one-hot masks a categorical one.
    # (A new model: Keras cannot fit one model on masks of two ranks.)
    compile_for_segmentation(SemanticFPN(backbone, num_classes=3, **SMALL_HEAD)).fit(
        images, masks[..., None], batch_size=2, verbose=0)
    one_hot = SemanticFPN(backbone, num_classes=3, **SMALL_HEAD)
    one_hot.compile("adam", keras.losses.CategoricalCrossentropy(from_logits=True))
    one_hot.fit(images, np.eye(3)[np.minimum(masks, 2)], batch_size=2, verbose=0)


def test_learns_synthetic_shapes_to_mean_iou_0_8():
    keras.utils.set_random_seed(0)
    images, masks = synthetic_shapes(320, (64, 96), seed=0)
    assert (masks == IGNORE_LABEL).any() and set(np.unique(masks)) == {0, 1, 2, IGNORE_LABEL}
    train = tf.data.Dataset.from_tensor_slices((images[:256], masks[:256]))
    train = train.shuffle(256, seed=0).batch(16, drop_remainder=True).prefetch(2)
    validation = tf.data.Dataset.from_tensor_slices((images[256:], masks[256:])).batch(32)

    backbone = keras_twins.Twins(**{**TINY, "embed_dims": (16, 32, 48, 64)},
                                 include_top=False, input_shape=(64, 96, 3))
    model = SemanticFPN(backbone, num_classes=3, **SMALL_HEAD)
    compile_for_segmentation(model, keras.optimizers.AdamW(3e-3, weight_decay=1e-4))
    history = model.fit(train, validation_data=validation, epochs=12, verbose=0)
    mean_iou = history.history["val_mean_iou"][-1]
    print(f"validation mean IoU {mean_iou:.3f}, loss {history.history['val_loss'][-1]:.3f}")
    assert mean_iou >= 0.8

    # The metric's own figure, recomputed by hand with the ignored pixels left out.
    predicted = model.predict(images[256:], verbose=0).argmax(-1)
    valid = masks[256:] != IGNORE_LABEL
    ious = [np.sum((predicted == c) & (masks[256:] == c) & valid)
            / np.sum(((predicted == c) | (masks[256:] == c)) & valid) for c in range(3)]
    assert abs(np.mean(ious) - mean_iou) < 1e-3


def test_tflite_export_runs_with_builtin_ops_only(tmp_path):
    backbone = keras_twins.Twins(**TINY, include_top=False, input_shape=(97, 131, 3))
    model = SemanticFPN(backbone, num_classes=4, **SMALL_HEAD)
    images = np.random.default_rng(1).uniform(0, 255, (1, 97, 131, 3)).astype("float32")
    expected = model.predict(images, verbose=0)
    path = export(model, tmp_path / "segmentation.tflite", output="logits")

    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=2)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], images)
    interpreter.invoke()
    logits = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    assert logits.shape == (1, 97, 131, 4)
    assert np.abs(logits - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
    report = tflite_report(str(path))
    assert report["flex_or_custom"] == [] and report["shape_arithmetic"] == []
    assert "RESIZE_BILINEAR" in report["ops"]


def test_onnx_export_resizes_to_exact_sizes_at_any_batch(tmp_path, capfd):
    """tf2onnx wrote each resize as float32 scales; ONNX floors input x scale,
    and the logits of a 97-pixel image (24 rows, x 4.0416665) came to 96 rows
    in shape inference: onnxruntime warned, and a runtime following it wrote
    96."""
    import onnx
    import onnxruntime

    backbone = keras_twins.Twins(**TWO_STAGES, include_top=False, input_shape=(97, 131, 3))
    model = SemanticFPN(backbone, num_classes=4, **SMALL_HEAD)
    images = np.random.default_rng(1).uniform(0, 255, (2, 97, 131, 3)).astype("float32")
    expected = model.predict(images, verbose=0)
    path = export(model, tmp_path / "segmentation.onnx", format="onnx", batch_size=None,
                  output="logits")
    inferred = onnx.shape_inference.infer_shapes(onnx.load(path), strict_mode=True)
    dims = inferred.graph.output[0].type.tensor_type.shape.dim
    assert [dim.dim_param or dim.dim_value for dim in dims] == ["batch", 97, 131, 4]
    capfd.readouterr()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: images})[0]
    assert "MergeShapeInfo" not in capfd.readouterr().err
    assert logits.shape == (2, 97, 131, 4)
    assert np.abs(logits - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def test_example_fine_tunes_and_draws_offline(tmp_path):
    import pathlib
    import subprocess
    import sys

    example = pathlib.Path(__file__).resolve().parents[1] / "examples" / "segmentation.py"
    output = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(example), "--data", "synthetic", "--weights", "none",
         "--image-size", "64", "96", "--epochs", "1", "--steps-per-epoch", "3",
         "--batch-size", "16",
         "--output", str(output)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^3/3 ", result.stdout, re.MULTILINE), result.stdout
    assert (output / "model.keras").stat().st_size > 1_000_000
    from PIL import Image

    with Image.open(output / "predictions.png") as picture:
        assert picture.size == (3 * 96, 4 * 64)  # image | truth | prediction, 4 rows

    bad = subprocess.run([sys.executable, str(example), "--data", "tfds:nope"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "error: --data must be" in bad.stderr
    assert "Traceback" not in bad.stderr

    # A later run replaces its own files, and never a training run's model.keras.
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("segmentation_example", example)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.is_output_folder(output), sorted(os.listdir(output))
    run = tmp_path / "classifier_run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "model.keras").write_bytes(b"the classifier")
    refused = subprocess.run([sys.executable, str(example), "--data", "synthetic",
                              "--output", str(run)], capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode != 0 and "holds other files" in refused.stderr, refused.stderr
    assert (run / "model.keras").read_bytes() == b"the classifier"
