"""Scoring a trained model: keras_twins.training.evaluate and the run's class names."""

import json
import re

import keras
import numpy as np
import pytest
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
