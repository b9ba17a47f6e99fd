"""Scoring a trained model: keras_twins.training.evaluate and the run's class names."""

import json
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import keras_twins
from conftest import TINY
from conftest import image_folder
from conftest import run_cli
from keras_twins import training


def test_evaluate_names_the_split_it_scored(tmp_path, capfd):
    """With no validation split, "auto" scores the train split: the output
    read as a validation accuracy."""
    model = keras_twins.Twins(**TINY, classes=2, input_shape=(32, 32, 3))
    model.save(tmp_path / "model.keras")
    only_train = image_folder(tmp_path / "only_train", per_class=2, splits=("train",))
    code, out, err = run_cli(capfd, "evaluate", "--data", only_train, "--model-file",
                             tmp_path / "model.keras")
    assert code == 0, err
    assert out.startswith(f"4 examples of the train split ({only_train} has no validation or "
                          "val or test split): loss "), out
    both = image_folder(tmp_path / "both", per_class=3)
    code, out, err = run_cli(capfd, "evaluate", "--data", both, "--model-file",
                             tmp_path / "model.keras")
    assert code == 0 and out.startswith("6 examples of the validation split: loss "), out
    results = training.evaluate(both, tmp_path / "model.keras", split="train", verbose=0)
    assert results["split"] == "train" and results["examples"] == 6
    # A run's model: "auto" is the split its run validated on, on the data it
    # trained on (named as then, or by another path), and not on other data.
    run = tmp_path / "run"
    run.mkdir()
    model.save(run / "model.keras")
    (run / "run.json").write_text(json.dumps({"data": str(only_train),
                                              "validation_split": "train[50%:]"}))
    (run / "labels.txt").write_text("circle\nsquare\n")
    for data, split, count in [(only_train, "train[50%:]", 2),
                               (str(only_train) + "/../only_train", "train[50%:]", 2),
                               (both, "validation", 6)]:
        results = training.evaluate(data, run / "model.keras", verbose=0)
        assert (results["split"], results["examples"]) == (split, count), data
    # The same name for other data (a relative path run elsewhere) without that split.
    (run / "run.json").write_text(json.dumps({"data": str(both), "validation_split": "holdout"}))
    assert training.evaluate(both, run / "model.keras", verbose=0)["split"] == "validation"
    # No split to fall back on: the error names every split "auto" looks for.
    loose = tmp_path / "loose"
    image_folder(loose, per_class=1, splits=("train",))
    (loose / "train").rename(loose / "images")
    code, out, err = run_cli(capfd, "evaluate", "--data", loose, "--model-file",
                             tmp_path / "model.keras")
    assert code == 1 and err.strip().splitlines()[-1] == (
        f"error: {loose}: no 'validation', 'val', 'test' or 'train' split (found: images)"), err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no 'validation', 'val', 'test' or 'train' split "
                                         r"\(found: no sub-folders\)$"):
        training.evaluate(empty, tmp_path / "model.keras", verbose=0)


def test_a_runs_labels_that_do_not_name_the_outputs_are_named_in_a_warning(tmp_path, capfd):
    """predict, export and evaluate fell back to class_0, class_1, ... without a word."""
    from keras_twins import export

    run = tmp_path / "run"
    run.mkdir()
    keras_twins.Twins(**TINY, classes=2, input_shape=(32, 32, 3)).save(run / "model.keras")
    (run / "run.json").write_text("{}")
    model = keras.models.load_model(run / "model.keras")
    for labels, problem in [(b"\xff\xfe\x00", "missing or not UTF-8 text"),
                            (b"cat\n", "1 names for 2 outputs"),
                            (b"cat\n\ndog\n", "3 names for 2 outputs"),
                            (b"cat\n\n", "line 2 is empty"),
                            (None, "missing or not UTF-8 text")]:
        if labels is not None:
            (run / "labels.txt").write_bytes(labels)
        else:
            (run / "labels.txt").unlink()
        with pytest.warns(export.LabelsWarning) as caught:
            assert export.class_names(model, run / "model.keras") == ["class_0", "class_1"]
        assert [str(w.message) for w in caught] == [
            f"{run / 'labels.txt'} does not name the model's 2 classes ({problem}); "
            "it is not used"]
    data = image_folder(tmp_path / "data", per_class=1, splits=("validation",))
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "image.png")
    for command in [("predict", tmp_path / "image.png", "--model", run / "model.keras"),
                    ("evaluate", "--data", data, "--model-file", run / "model.keras"),
                    ("export", "--model", run / "model.keras", "--format", "onnx",
                     "--output", tmp_path / "model.onnx")]:
        code, out, err = run_cli(capfd, *command)
        assert code == 0, err
        assert [line for line in err.splitlines() if line.startswith("warning:")] == [
            f"warning: {str(caught[0].message)}"], err
    assert (tmp_path / "labels.txt").read_text() == "class_0\nclass_1\n"
    (run / "labels.txt").write_text("cat\ndog\n")  # a run's names, used without a word
    code, out, err = run_cli(capfd, "predict", tmp_path / "image.png", "--model",
                             run / "model.keras")
    assert code == 0 and "warning" not in err and re.search(r"\b(cat|dog)\b", out), out
    # Edited on Windows: Notepad's byte-order mark and CRLF line ends are not in the names.
    (run / "labels.txt").write_bytes(b"\xef\xbb\xbfcat\r\ndog\r\n")
    assert export.class_names(model, run / "model.keras") == ["cat", "dog"]


def test_a_head_without_softmax_is_scored_and_shown_as_probabilities(tmp_path, capfd):
    """classifier_activation=None: evaluate took its logits for probabilities
    (loss 2.28 against 1.35 here) and predict printed them as such; a model
    without a head was "a model of 64 classes"."""
    data = image_folder(tmp_path / "data", per_class=4)
    softmax = keras_twins.Twins(**TINY, input_shape=(32, 32, 3), classes=2)
    logits = keras_twins.Twins(**TINY, input_shape=(32, 32, 3), classes=2,
                               classifier_activation=None)
    logits.set_weights(softmax.get_weights())
    features = keras_twins.Twins(**TINY, input_shape=(32, 32, 3), include_top=False)
    for name, model in [("softmax", softmax), ("logits", logits), ("features", features)]:
        model.save(tmp_path / f"{name}.keras")
    scores = {name: training.evaluate(data, tmp_path / f"{name}.keras", verbose=0)
              for name in ("softmax", "logits")}
    assert scores["softmax"]["loss"] == pytest.approx(scores["logits"]["loss"], abs=1e-5)
    image = data / "train" / "circle" / "0.png"
    shown = {}
    for name in ("softmax", "logits"):
        code, out, err = run_cli(capfd, "predict", "--model", tmp_path / f"{name}.keras",
                                 "--json", image)
        assert code == 0, err
        shown[name] = [p["probability"] for p in json.loads(out)[0]["predictions"]]
    assert shown["logits"] == pytest.approx(shown["softmax"], abs=1e-6)
    assert sum(shown["logits"]) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(training.TrainingError, match="not an image classifier"):
        training.evaluate(data, tmp_path / "features.keras", verbose=0)


def test_an_exported_tflite_file_is_scored_as_the_app_runs_it(tmp_path, capfd):
    """What int8 costs on a user's own data needed a script of their own:
    evaluate took only .keras models, and named a TFLite file "not a loadable
    Keras model"."""
    from keras_twins.export import TFLiteClassifier
    from keras_twins.export import export
    from keras_twins.images import load_image
    from keras_twins.segmentation import SemanticFPN

    names = [f"c{i}" for i in range(6)]
    for folder in ("batch4", "logits", "int8", "shuffled"):
        (tmp_path / folder).mkdir()
    data = image_folder(tmp_path / "data", classes=names, per_class=3)  # 18: not 4 * n
    keras.utils.set_random_seed(0)
    model = keras_twins.Twins(**TINY, classes=6, input_shape=(32, 32, 3))
    model.save(tmp_path / "model.keras")
    keras_results = training.evaluate(data, tmp_path / "model.keras", verbose=0)
    photos = sorted((data / "validation" / "c2").iterdir())
    keras_probabilities = model.predict(np.stack([load_image(p, 32) for p in photos]),
                                        verbose=0)
    for name, kwargs in [("batch4", dict(batch_size=4, labels=names)),
                         ("logits", dict(output="logits"))]:
        path = export(model, tmp_path / name / "model.tflite", image_size=32, **kwargs)
        results = training.evaluate(data, path, verbose=0)
        assert (results["split"], results["examples"]) == ("validation", 18)
        assert abs(results["loss"] - keras_results["loss"]) < 1e-5, (results, keras_results)
        assert results["accuracy"] == keras_results["accuracy"]
        assert results["top5"] == keras_results["top5"] < 1.0
        # predict runs it too, with the labels it carries, as probabilities.
        code, out, err = run_cli(capfd, "predict", *photos, "--model", path, "--top", "6",
                                 "--json")
        assert code == 0, err
        for entry, expected in zip(json.loads(out), keras_probabilities, strict=True):
            ours = {p["class_id"]: p["probability"] for p in entry["predictions"]}
            np.testing.assert_allclose([ours[i] for i in range(6)], expected, atol=1e-6)
            assert {p["label"] for p in entry["predictions"]} == (
                set(names) if name == "batch4" else {f"class_{i}" for i in range(6)})
    classifier = TFLiteClassifier(tmp_path / "batch4" / "model.tflite")
    assert (classifier.image_size, classifier.channels, classifier.batch_size) == ((32, 32), 3, 4)
    assert classifier(np.zeros((0, 32, 32, 3))).shape == (0, 6)
    with pytest.raises(ValueError, match=re.escape("takes images of shape (n, 32, 32, 3). "
                                                   "Received: shape (1, 48, 48, 3)")):
        classifier(np.zeros((1, 48, 48, 3)))
    # Full integer: its outputs are the float model's to a quantization step.
    int8 = export(model, tmp_path / "int8" / "model.tflite", image_size=32, quantize="int8",
                  representative_data=str(data / "train"))
    code, out, err = run_cli(capfd, "evaluate", "--data", data, "--model-file", int8)
    assert code == 0, err
    loss = float(re.search(r"^18 examples of the validation split: loss (\S+),", out)[1])
    assert abs(loss - keras_results["loss"]) < 0.05, (out, keras_results)

    # The labels an export of a run's model carries are checked against the split.
    path = export(model, tmp_path / "shuffled" / "model.tflite", image_size=32,
                  labels=names[1:] + names[:1])
    with pytest.raises(training.TrainingError, match=re.escape(
            "label 0 is 'c0' in the split and 'c1' in the model")):
        training.evaluate(data, path, verbose=0)
    # A file without the metadata that says what it takes, and damaged ones.
    converter = tf.lite.TFLiteConverter.from_concrete_functions([tf.function(
        lambda x: tf.nn.softmax(tf.reduce_mean(x, [1, 2])),
        input_signature=[tf.TensorSpec([1, 32, 32, 6])]).get_concrete_function()])
    foreign = tmp_path / "foreign.tflite"
    foreign.write_bytes(converter.convert())
    content = (tmp_path / "logits" / "model.tflite").read_bytes()
    (tmp_path / "cut.tflite").write_bytes(content[:len(content) // 2])
    (tmp_path / "header.tflite").write_bytes(content[:8] + bytes(64 * [255]) + content[72:])
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")
    (tmp_path / "segmentation").mkdir()
    segmentation = export(SemanticFPN(keras_twins.Twins(**TINY, include_top=False), 3),
                          tmp_path / "segmentation" / "model.tflite", image_size=32)
    (tmp_path / "folder.tflite").mkdir()
    code, _, err = run_cli(capfd, "predict", photos[0], "--model", tmp_path / "folder.tflite")
    assert code == 1 and err.strip() == f"error: {tmp_path / 'folder.tflite'}: a folder, not a " \
        "TFLite file", err
    for path, message in [
            (segmentation, "not an image classifier (its output has shape [1, 32, 32, 3], not "
                           "(batch, classes))"),
            (tmp_path / "model.onnx", "not a model evaluate reads; it takes a .keras model or "
                                      "a .tflite file (from export)"),
            (tmp_path / "int8", "not a model evaluate reads"),
            (foreign, "a TFLite file without keras_twins' input contract"),
            (tmp_path / "cut.tflite", "not a readable TFLite file (damaged or cut short)"),
            (tmp_path / "header.tflite", "not a readable TFLite file (damaged or cut short)")]:
        code, out, err = run_cli(capfd, "evaluate", "--data", data, "--model-file", path)
        assert code == 1 and out == "", (out, err)
        line, = err.strip().splitlines()
        assert line.startswith(f"error: {path}: {message}"), err
