"""The examples answer bad input with one line that names it, and write nothing;
what finetune trains and exports names the same classes."""

import os
import pathlib
import subprocess
import sys

import pytest

from conftest import image_folder

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("argv, message", [
    # A KeyError traceback.
    (["export_tflite.py", "--model", "model.keras"], "invalid choice: 'model.keras'"),
    # DataError tracebacks.
    (["finetune.py", "nowhere", "--output", "run"], "nowhere: no such folder"),
    # argparse's usage above the line.
    (["train_imagenet.py", "--manual-dir", "tars", "--output", "run", "--epochs", "x"],
     "argument --epochs: invalid int value: 'x'"),
    # A TrainingError traceback, after the demo's folder was replaced.
    (["demo.py", "--epochs", "0", "--output", "demo"], "--epochs must be at least 1"),
])
def test_bad_input_is_one_line(argv, message, tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / argv[0]), *argv[1:]],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode != 0
    # Without TensorFlow's start-up notices above it (six lines, which
    # TF_CPP_MIN_LOG_LEVEL does not silence).
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


def test_finetune_exports_with_the_classes_it_trained_on(random_reference, tmp_path):
    """It exported without them: class_0, class_1 went into the run's
    labels.txt, and its model.keras then named the wrong classes."""
    _, reference = random_reference("twins_svt_small")
    data = image_folder(tmp_path / "data", classes=("circle", "carr\u00e9"), per_class=4)
    # A terminal that cannot show "carré": printing the classes raised after training.
    env = dict(os.environ, PYTHONIOENCODING="ascii")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "finetune.py"), str(data), "--output", "run",
         "--weights", str(reference / "model.safetensors"), "--epochs", "1",
         "--batch-size", "4", "--image-size", "32", "--validation-split", "none"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "classes: carr\\xe9, circle" in result.stdout
    assert "validation top-1" not in result.stdout  # the data has a validation split
    assert (tmp_path / "run" / "labels.txt").read_text("utf-8") == "carr\u00e9\ncircle\n"
    assert (tmp_path / "run" / "model.tflite").stat().st_size > 1_000_000
