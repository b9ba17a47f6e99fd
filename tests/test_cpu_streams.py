"""CPU streams: the Keras loops slice batches and compute what they computed whole."""

import json
import pathlib
import subprocess
import sys

import pytest

import keras_twins
from conftest import TINY
from conftest import TINY_PCPVT

WORKER = pathlib.Path(__file__).with_name("streams_worker.py")


@pytest.mark.parametrize("config", [TINY, TINY_PCPVT], ids=["svt", "pcpvt"])
def test_streams_slice_batches_and_keep_predict_and_fit_results(config):
    run = subprocess.run([sys.executable, str(WORKER), json.dumps(config)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["streams"] == 2
    # predict on 7 images in batches of 3: traced for 3 (slices of 2 and 1),
    # then again for a size known only at run time (two slices, and the whole
    # batch for the last one, of 1 image).
    assert result["slices_predict"] == [2, 1, None, None, None]
    assert result["predict_error"] < 1e-5
    # fit on batches of 4: two slices of 2, same loss and update as whole.
    assert result["slices_fit"] == [2, 2]
    assert result["fit_loss_error"] < 1e-5
    assert result["fit_weight_error"] < 1e-5
    assert "before TensorFlow's first op" in result["late_error"]


@pytest.mark.parametrize("streams", [0, -1, 2.0, True, "2"])
def test_stream_count_must_be_a_positive_integer(streams):
    with pytest.raises(ValueError, match="positive integer"):
        keras_twins.use_cpu_streams(streams)
