"""The examples answer bad input with one line that names it, and write nothing."""

import pathlib
import subprocess
import sys

import pytest

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
