"""Stopping a training run and starting it again: what it resumes from, and
that it ends where an uninterrupted run does."""

import keras
import pytest

from conftest import TINY
from conftest import TWO_STAGES
from conftest import image_folder
from conftest import json_config
from conftest import max_difference
from conftest import run_cli
from keras_twins import training


class _StopAfterEpoch(keras.callbacks.Callback):
    """Stops the process as a kill would, once epoch `last` is backed up."""

    def __init__(self, last=0):
        super().__init__()
        self.last = last

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.last:
            raise KeyboardInterrupt


def test_a_deterministic_run_stopped_and_started_again_ends_as_an_uninterrupted_one(tmp_path):
    """A resumed run restarted the data's shuffle and augmentation, and the
    stochastic-depth masks, at those of epoch 0: its weights ended elsewhere."""
    data = str(image_folder(tmp_path / "data", per_class=8, splits=("train",)))
    settings = dict(image_size=16, epochs=2, batch_size=4, augment="imagenet",
                    deterministic=True, seed=3, validation_split=None, verbose=0,
                    model=dict(TWO_STAGES, drop_path_rate=0.5))
    whole = training.train(data, output=str(tmp_path / "whole"), **settings).model.get_weights()
    with pytest.raises(KeyboardInterrupt):
        training.train(data, output=str(tmp_path / "stopped"),
                       callbacks=[_StopAfterEpoch()], **settings)
    assert (tmp_path / "stopped" / "backup").is_dir()
    resumed = training.train(data, output=str(tmp_path / "stopped"), **settings)
    assert resumed.history["loss"] and len(resumed.history["loss"]) == 1
    assert max_difference(whole, resumed.model.get_weights()) == 0.0


def test_a_backup_cut_short_by_a_kill_resumes_from_the_one_before(tmp_path, capfd):
    """Keras writes its backup in place: a run killed while it wrote the
    metadata could not start again (a JSON traceback), nor one killed while
    it wrote the first backup's weights (an HDF5 traceback)."""
    data = str(image_folder(tmp_path / "data", per_class=8, splits=("train",)))
    settings = dict(image_size=16, epochs=3, batch_size=4, augment="light",
                    deterministic=True, seed=4, validation_split=None, verbose=0,
                    model=TWO_STAGES)
    whole = training.train(data, output=str(tmp_path / "whole"), **settings).model.get_weights()
    for damaged in ("latest.weights.h5", "training_metadata.json"):
        output = tmp_path / damaged
        with pytest.raises(KeyboardInterrupt):  # backups of epochs 0 and 1
            training.train(data, output=str(output), callbacks=[_StopAfterEpoch(1)],
                           **settings)
        path = output / "backup" / damaged
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
        resumed = training.train(data, output=str(output), **settings)
        assert len(resumed.history["loss"]) == 2, damaged  # epochs 1 and 2
        assert max_difference(whole, resumed.model.get_weights()) == 0.0, damaged

    # Cut short while the first backup was written: there is none before it.
    output = tmp_path / "first"
    with pytest.raises(KeyboardInterrupt):
        training.train(data, TINY, output=str(output), image_size=32, epochs=1, batch_size=4,
                       augment="none", verbose=0, callbacks=[_StopAfterEpoch(0)])
    weights = output / "backup" / "latest.weights.h5"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, out, err = run_cli(capfd, "train", "--data", data, "--model", json_config(tmp_path),
                             "--image-size", "32", "--epochs", "1", "--batch-size", "4",
                             "--augment", "none", "--resume", "-o", output)
    assert code == 0, err[-2000:]
    assert f"warning: the backup in {output / 'backup'} did not read (latest.weights.h5 " \
           "does not read" in err, err[-2000:]
    assert "the run starts again from its first epoch" in err
    assert (output / "model.keras").exists() and not (output / "backup").exists()
