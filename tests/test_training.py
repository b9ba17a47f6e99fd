"""Training: model.fit on tf.data, the recipe, tf.distribute, resumable runs."""

import csv
import functools
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import TINY
from conftest import image_folder
from conftest import json_config
from conftest import max_difference
from conftest import run_cli
from conftest import TWO_STAGES
import keras_twins
from keras_twins import data as data_lib
from keras_twins import export as export_lib
from keras_twins import training
from keras_twins.images import grayscale

WORKER = pathlib.Path(__file__).with_name("train_worker.py")
# Small enough to train in seconds, large enough to learn the digits.
COMPACT = dict(embed_dims=(32, 64, 96, 128), depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4),
               mlp_ratios=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1), window_sizes=(7, 7, 7, 7))
TINY_LIST = {k: list(v) for k, v in TINY.items()}


def run_worker(tmp_path, name, env=None, **settings):
    path = tmp_path / f"{name}.json"
    settings.setdefault("weights_out", str(tmp_path / f"{name}.npz"))
    path.write_text(json.dumps(settings))
    return subprocess.Popen([sys.executable, str(WORKER), str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def finish(process, timeout=600):
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def weights(path):
    with np.load(path) as arrays:
        return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


def test_mirrored_over_two_cpus_gives_the_single_device_weights(tmp_path):
    data = image_folder(tmp_path / "data", per_class=16)
    # Clipping at 1.0 is active on every step: Keras alone clipped each
    # replica's share, which this comparison caught (1.4e-3 apart).
    common = dict(data=str(data), model=TINY_LIST, image_size=32, epochs=2, augment="none",
                  deterministic=True, drop_path_rate=0.0, seed=3, learning_rate=1e-4,
                  warmup_epochs=0.5, clipnorm=1.0, validation_split=None)
    mirrored = run_worker(tmp_path, "mirrored", **common, output=str(tmp_path / "m"),
                          batch_size=4, logical_cpus=2,
                          strategy={"mirrored": ["/cpu:0", "/cpu:1"]})
    single = run_worker(tmp_path, "single", **common, output=str(tmp_path / "s"),
                        batch_size=8, strategy="one_device")
    assert finish(mirrored)["replicas"] == 2
    assert finish(single)["replicas"] == 1
    first = weights(tmp_path / "single.npz")
    difference = max_difference(weights(tmp_path / "mirrored.npz"), first)
    print(f"\nmax |weights(mirrored 2 CPUs) - weights(one device)| = {difference:.2e}")
    assert difference <= 1e-5
    # They trained: 8 steps moved the weights away from their initialization.
    keras.utils.set_random_seed(3)
    initial = training.build_model(TINY_LIST, 2, (32, 32)).get_weights()
    assert max_difference(first, initial) > 1e-4


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_mirrored_two_processes_train_to_the_same_weights(tmp_path):
    data = image_folder(tmp_path / "data", per_class=16)
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = []
    for index in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        processes.append(run_worker(
            tmp_path, f"worker{index}", env={"TF_CONFIG": json.dumps(config)},
            data=str(data), model=TINY_LIST, image_size=32, epochs=1, batch_size=4,
            augment="light", seed=5, output=str(tmp_path / "run"),
            strategy="multi_worker"))
    try:
        results = [finish(p, timeout=400) for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert [r["replicas"] for r in results] == [2, 2]
    assert [r["epochs"] for r in results] == [1, 1]
    assert np.isfinite(results[0]["loss"]).all()
    difference = max_difference(weights(tmp_path / "worker0.npz"),
                                weights(tmp_path / "worker1.npz"))
    assert difference <= 1e-6
    # The chief wrote the run folder; the other worker left nothing behind.
    run = tmp_path / "run"
    assert (run / "model.keras").exists() and (run / "history.csv").exists()
    assert [p.name for p in run.iterdir() if "backup" in p.name or "worker" in p.name] == []


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_killed_run_resumes_from_its_backup_and_finishes(tmp_path):
    data = image_folder(tmp_path / "data", per_class=60, splits=("train",), size=(32, 32))
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    output = tmp_path / "run"
    command = [sys.executable, "-m", "keras_twins", "train", "--data", str(data),
               "--model", str(config), "--image-size", "32", "--epochs", "3",
               "--batch-size", "2", "--augment", "none", "--backup-freq", "5",
               "--output", str(output)]
    history = output / "history.csv"
    metadata = output / "backup" / "training_metadata.json"
    # The killed process cannot delete its temporary files (TensorFlow's
    # autograph modules): keep them in tmp_path.
    (tmp_path / "tmp").mkdir()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    deadline = time.monotonic() + 300

    def backed_up_in_epoch_2():
        try:
            return json.loads(metadata.read_text())["epoch"] == 1
        except (OSError, ValueError):  # not there yet, or being written
            return False

    while not backed_up_in_epoch_2():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # A backup of the second epoch exists: kill the run outright.
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(read_rows(history)) == 1, "the kill should land mid-epoch 2"
    assert not (output / "model.keras").exists()

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Epoch 1/3" not in resumed.stderr and "Epoch 2/3" in resumed.stderr
    assert [row["epoch"] for row in read_rows(history)] == ["0", "1", "2"]
    assert (output / "model.keras").exists() and not (output / "backup").exists()
    assert "trained 2 epoch(s)" in resumed.stdout


def test_cli_trains_a_compact_twins_on_the_digits_to_94_percent(tmp_path, capfd):
    # With CPU streams on, as a CPU-only user would train: each batch of 32
    # runs as one slice per core.
    data = data_lib.write_digits_folder(tmp_path / "digits")
    config = tmp_path / "compact.json"
    config.write_text(json.dumps(COMPACT))
    output = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "keras_twins", "train", "--data", data, "--model", str(config),
         "--image-size", "32", "--epochs", "6", "--batch-size", "32", "--augment", "none",
         "--learning-rate", "1e-3", "--warmup-epochs", "1", "--drop-path-rate", "0",
         "--output", str(output), "--cpu-streams"], capture_output=True, text=True,
        timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"each batch as \d+ CPU streams", result.stdout), result.stdout
    rows = read_rows(output / "history.csv")
    assert len(rows) == 6
    best = max(float(row["val_accuracy"]) for row in rows)
    with capfd.disabled():
        print(f"\ndigits: validation accuracy {float(rows[-1]['val_accuracy']):.4f} "
              f"(best {best:.4f}) after 6 epochs")
    # From timm's initialization, three runs ended at 95.8% to 96.7% (from
    # Glorot's, 97.8%): 94% leaves the input order a few digits of room.
    assert float(rows[-1]["val_accuracy"]) >= 0.94
    for name in ("model.keras", "training.png", "labels.txt", "run.json",
                 "checkpoints/best.keras", "checkpoints/last.keras"):
        assert (output / name).exists(), name
    assert any((output / "logs").rglob("events.out.tfevents.*"))
    assert Image.open(output / "training.png").size == (1120, 400)

    evaluated = subprocess.run(
        [sys.executable, "-m", "keras_twins", "evaluate", "--data", data, "--model-file",
         str(output / "model.keras"), "--json", "--cpu-streams"], capture_output=True,
        text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    metrics = json.loads(evaluated.stdout)
    assert metrics["examples"] == 359 and metrics["split"] == "validation"
    assert abs(metrics["accuracy"] - float(rows[-1]["val_accuracy"])) < 1e-6

    # The trained model.keras goes on to predict and export through the
    # command, named by the run's labels.txt (both took only a variant name
    # or a CONFIG.json, and exported labels were class_0, class_1, ...).
    images = sorted(pathlib.Path(data, "validation").glob("*/*.png"))
    code, out, err = run_cli(capfd, "predict", "--model", output / "model.keras",
                             "--top", "1", "--json", *images)
    assert code == 0, err
    predicted = [entry["predictions"][0]["label"] for entry in json.loads(out)]
    correct = sum(p == image.parent.name for p, image in zip(predicted, images))
    with capfd.disabled():
        print(f"digits: predict (Pillow's resize) top-1 {correct / len(images):.4f}")
    # Pillow's resize and crop for predict, TensorFlow's for evaluate: the same
    # geometry (a pixel off in the crop cost predict 9 points here).
    assert abs(correct / len(images) - metrics["accuracy"]) <= 0.01, predicted
    code, out, err = run_cli(capfd, "export", "--model", output / "model.keras",
                             "--format", "tflite", "--output", tmp_path / "digits.tflite")
    assert code == 0, err
    assert "input 1x32x32x3" in out
    assert (tmp_path / "labels.txt").read_text() == (output / "labels.txt").read_text()
    code, out, err = run_cli(capfd, "export", "--model", output / "model.keras",
                             "--weights", "imagenet", "--format", "onnx",
                             "--output", tmp_path / "digits.onnx")
    assert code == 1 and "a .keras model holds its own weights" in err
    # A model whose run named its classes otherwise is not scored on this split.
    other = tmp_path / "other_run"
    other.mkdir()
    for name in ("model.keras", "run.json"):
        shutil.copy(output / name, other / name)
    (other / "labels.txt").write_text("".join(f"{name}\n" for name in "0123456798"))
    code, out, err = run_cli(capfd, "evaluate", "--data", data, "--model-file",
                             other / "model.keras")
    assert code == 1 and "label 8 is '8' in the split and '9' in the model" in err, err


@pytest.mark.parametrize("precision, jit_compile", [("float16", False), ("bfloat16", True)])
def test_tfds_source_and_mixed_precision_train_with_finite_losses(precision, jit_compile,
                                                                  tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    # tfds leaves an empty temporary folder for a dataset it has not prepared.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        result = training.train(
            "tfds:mnist", TINY_LIST, output=tmp_path / "run", image_size=32, epochs=1,
            batch_size=8, augment="imagenet", mixed_precision=precision, jit_compile=jit_compile,
            strategy="one_device", validation_split="test", verbose=0)
    assert result.class_names == [str(i) for i in range(10)]
    losses = result.history["loss"] + result.history["val_loss"]
    assert np.all(np.isfinite(losses)), losses
    assert keras.config.dtype_policy().name == "float32"  # restored
    saved = keras.models.load_model(tmp_path / "run" / "model.keras")
    assert saved.layers[-1].dtype_policy.name == "float32"
    assert {layer.dtype_policy.name for layer in saved.layers} == {"float32"}


@functools.cache
def tfds_shapes():
    """A tensorflow-datasets builder of ten images in two classes, registered once."""
    import tensorflow_datasets as tfds

    class KerasTwinsTestShapes(tfds.core.GeneratorBasedBuilder):
        # A module inside a package, as every tensorflow-datasets builder's:
        # tfds looks for checksums beside it.
        __module__ = "keras_twins.test_shapes"
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=["dark", "light"])}),
                supervised_keys=("image", "label"))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(10):
                image = np.full((28 + i, 32, 3), 40 + 160 * (i % 2), np.uint8)
                yield i, {"image": image, "label": i % 2}

    return KerasTwinsTestShapes


def test_a_tfds_dataset_is_prepared_for_real(tmp_path):
    """Preparing any tensorflow-datasets dataset needed importlib_resources,
    which tensorflow-datasets does not install: `tfds:NAME` failed with
    ModuleNotFoundError for every dataset not prepared before. The mocked
    builders of the other tests skip that step."""
    shapes = tfds_shapes()
    split = data_lib.load_split("tfds:keras_twins_test_shapes", "train", str(tmp_path))
    assert split.class_names == ["dark", "light"] and split.num_examples == 10
    labels = sorted(int(label) for _, label in split.dataset.as_numpy_iterator())
    assert labels == [0] * 5 + [1] * 5
    # `evaluate`'s "auto" takes train when there is nothing else, and names
    # the splits it looked for when there is not even that.
    assert data_lib.evaluation_split("tfds:keras_twins_test_shapes", str(tmp_path)) == "train"

    class KerasTwinsTestHoldout(shapes):
        def _split_generators(self, dl_manager):
            return {"holdout": self._generate_examples()}

    with pytest.raises(data_lib.DataError, match=r"^tfds:keras_twins_test_holdout has no "
                       r"'validation', 'val', 'test' or 'train' split \(found: holdout\)$"):
        data_lib.evaluation_split("tfds:keras_twins_test_holdout", str(tmp_path))


def test_a_tfds_download_that_cannot_reach_its_host_fails_in_seconds(tmp_path):
    """tensorflow-datasets retried each request 10 times with doubling waits:
    with no network, `train --data tfds:tf_flowers` failed after 3.4 minutes."""
    import http.server
    import threading

    import tensorflow_datasets as tfds

    requests = []

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_error(503)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    closed_port = free_ports(1)[0]
    urls = {"unavailable": f"http://127.0.0.1:{server.server_port}/images.tgz",
            "unreachable": f"http://127.0.0.1:{closed_port}/images.tgz"}

    class KerasTwinsTestDownload(tfds_shapes()):
        __module__ = "keras_twins.test_download"
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in urls]

        def _split_generators(self, dl_manager):
            dl_manager.download(urls[self.builder_config.name])
            return {"train": self._generate_examples()}

    try:
        with pytest.raises(data_lib.DataError, match=r"^tfds:keras_twins_test_download/"
                           r"unavailable cannot be prepared: .*too many 503 error"):
            data_lib.load_split("tfds:keras_twins_test_download/unavailable", "train",
                                str(tmp_path))
    finally:
        server.shutdown()
        server.server_close()
    assert len(requests) == data_lib.DOWNLOAD_RETRIES + 1 <= 6
    with pytest.raises(data_lib.DataError, match=(
            r"^tfds:keras_twins_test_download/unreachable cannot be prepared: .*Connection "
            r"refused.* \(no network\? Prepare it where there is one, `tfds build "
            r"keras_twins_test_download/unreachable`, and point --data-dir")):
        data_lib.load_split("tfds:keras_twins_test_download/unreachable", "train",
                            str(tmp_path))


def test_tfds_slices_split_a_dataset_that_has_only_train(tmp_path):
    """tensorflow-datasets' slices ('train[:90%]') were refused as unknown
    splits, and train() always trained on all of train: a dataset with only
    train (tf_flowers) could not hold out a validation part."""
    tfds_shapes()
    source, data_dir = "tfds:keras_twins_test_shapes", str(tmp_path / "tfds")
    for split, count in [("train[:80%]", 8), ("train[8:]", 2), ("train[:2]+train[-1:]", 3)]:
        loaded = data_lib.load_split(source, split, data_dir)
        assert loaded.num_examples == count and sum(1 for _ in loaded.dataset) == count
    for split, message in [("test", "tfds:keras_twins_test_shapes has no split 'test' "
                                    "(found: train)"),
                           ("test[:5]", "Unknown split 'test'"),
                           ("train[:200%]", "Error parsing split 'train[:200%]'"),
                           ("train[:0%]", "the split 'train[:0%]' holds no examples")]:
        with pytest.raises(data_lib.DataError, match=re.escape(message)):
            data_lib.load_split(source, split, data_dir)
    result = training.train(source, TINY_LIST, output=str(tmp_path / "run"), image_size=32,
                            epochs=1, batch_size=4, augment="none", data_dir=data_dir,
                            train_split="train[:80%]", validation_split="train[80%:]")
    # 8 training images in batches of 4: 2 steps; the validation part scored.
    assert result.history["val_loss"] and len(result.history["loss"]) == 1
    with open(tmp_path / "run" / "run.json") as f:
        run = json.load(f)
    assert run["train_split"] == "train[:80%]" and run["validation_split"] == "train[80%:]"
    # "auto" scores the part the run validated on, not all of train.
    evaluated = training.evaluate(source, tmp_path / "run" / "model.keras", data_dir=data_dir,
                                  verbose=0)
    assert evaluated["split"] == "train[80%:]" and evaluated["examples"] == 2


def test_deterministic_runs_in_one_process_train_to_the_same_weights(tmp_path):
    """The pipeline's seeds came from whatever global seed the process had when
    it was traced: a second run in one process trained to other weights."""
    data = str(image_folder(tmp_path / "data", per_class=8, splits=("train",)))
    trained = [training.train(data, TWO_STAGES, output=str(tmp_path / f"run{i}"),
                              image_size=16, epochs=1, batch_size=4, augment="imagenet",
                              deterministic=True, seed=seed, validation_split=None,
                              verbose=0).model.get_weights()
               for i, seed in enumerate((1, 1, 2))]
    assert max_difference(trained[0], trained[1]) == 0.0
    assert max_difference(trained[0], trained[2]) > 1e-4


@pytest.mark.parametrize("dtype, stored, expected", [
    ("uint16", 50000, 50000 >> 8), ("float32", 0.75, int(0.75 * 255.5))])
def test_a_tfds_dataset_of_16_bit_or_float_images_keeps_its_brightness(dtype, stored, expected,
                                                                      tmp_path):
    """tensorflow-datasets stores uint16 and float32 images too. A plain cast
    to uint8 wrapped 50000 to 80 and truncated 0.75 to 0; TensorFlow's image
    convention, as its decoder applies to a 16-bit PNG, gives 195 and 191."""
    import tensorflow_datasets as tfds

    def info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 1), dtype=getattr(np, dtype)),
                "label": tfds.features.ClassLabel(names=["a", "b"])}),
            supervised_keys=("image", "label"))

    def examples(self):
        for i in range(2):
            yield i, {"image": np.full((5, 6, 1), stored, dtype), "label": i}

    name = f"KerasTwinsTest{dtype.title()}Images"
    type(name, (tfds.core.GeneratorBasedBuilder,), {
        "__module__": "keras_twins.test_shapes", "VERSION": tfds.core.Version("1.0.0"),
        "_info": info, "_generate_examples": examples,
        "_split_generators": lambda self, dl_manager: {"train": self._generate_examples()}})
    split = data_lib.load_split(f"tfds:keras_twins_test_{dtype}_images", "train", str(tmp_path))
    for image, _ in split.dataset.as_numpy_iterator():
        assert image.dtype == np.uint8 and image.shape == (5, 6, 3)
        assert np.unique(image).tolist() == [expected]


def test_the_weight_decay_spares_biases_norms_and_the_peg():
    model = keras_twins_tiny()
    optimizer = training.make_optimizer(model, learning_rate=0.1, weight_decay=0.5)
    before = {v.path: np.array(v) for v in model.trainable_variables}
    # Zero gradients: Adam moves nothing, so only the decoupled decay shows.
    optimizer.apply_gradients([(np.zeros(v.shape, "float32"), v)
                               for v in model.trainable_variables])
    decayed = {v.path for v in model.trainable_variables
               if not np.allclose(np.array(v), before[v.path])}
    expected = {v.path for v in model.trainable_variables
                if len(v.shape) > 1 and "pos_encoding" not in v.path}
    assert decayed == expected
    assert any("pos_encoding" in v.path and len(v.shape) > 1
               for v in model.trainable_variables)


def test_adamw_updates_as_keras_adamw_does_one_kernel_per_variable():
    rng = np.random.default_rng(7)
    shapes = [(5, 3), (3,), (2, 2, 4), (4, 2), (6,), (3, 3)]
    start = [rng.normal(size=shape).astype("float32") for shape in shapes]
    gradients = [[rng.normal(size=shape).astype("float32") * 10 ** i for shape in shapes]
                 for i in range(-2, 2)]  # the last two steps are clipped
    # The recipe's schedule, warm-up then cosine: the four steps take both branches.
    schedule = keras.optimizers.schedules.CosineDecay(0.0, decay_steps=4, warmup_target=0.01,
                                                      warmup_steps=2)
    settings = dict(learning_rate=schedule, weight_decay=0.1, beta_1=0.8, beta_2=0.95,
                    epsilon=1e-3)
    results, ops = [], []
    for optimizer in (training.AdamW(clip_global_norm=5.0, **settings),
                      keras.optimizers.AdamW(global_clipnorm=5.0, **settings)):
        variables = [keras.Variable(value) for value in start]
        optimizer.exclude_from_weight_decay(var_list=variables[1:2])
        optimizer.build(variables)
        step = tf.function(lambda grads: optimizer.apply(grads, variables))
        for step_gradients in gradients:
            step(step_gradients)
        results.append([np.array(v) for v in variables])
        graph = step.get_concrete_function(gradients[0]).graph.as_graph_def()
        # Keras puts the update in a cond's branch, a function of the graph's library.
        ops.append([node.op for function in graph.library.function
                    for node in function.node_def] + [node.op for node in graph.node])
    for ours, keras_own, before in zip(*results, start):
        assert np.abs(ours - before).max() > 1e-3
        np.testing.assert_allclose(ours, keras_own, rtol=0, atol=1e-6)
    assert ops[0].count("ResourceApplyAdam") == len(shapes)
    assert ops[0].count("Mul") < ops[1].count("Mul") - 2 * len(shapes)
    # One set of Adam's scalars per step, not one per variable.
    assert ops[0].count("Pow") == 2
    # Keras evaluates the schedule, a cond, for the update and again for each
    # decayed variable (five here); here once for the update and once for the decay.
    conds = [sum(op.endswith("If") for op in found) for found in ops]
    assert conds == [2, 1 + len(shapes) - 1], conds


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_the_recipe_trains_on_keras_other_backends(backend, tmp_path):
    """The classifier and the segmentation model fit and evaluate on Keras'
    JAX and PyTorch backends. The recipe's AdamW failed on torch with
    "'Parameter' object has no attribute 'handle'" (TensorFlow's kernel); on
    JAX every step raised "train_step() takes 2 positional arguments but 3
    were given", and the recipe compiled without XLA, where a step of a small
    Twins took 16x as long. What needs TensorFlow is refused by name.
    Arrays go through `predict`, `fit` and `evaluate` without importing
    TensorFlow (the checks imported it, 5 s, and a JAX GPU machine may have
    none); only `training` and `export` need it. A label outside the classes
    is refused in one line, and an evaluate it stopped leaves the model whole.
    On JAX, building a model compiles no random draws."""
    script = tmp_path / "other_backend.py"
    script.write_text(f"""
import json
import sys
import keras
import numpy as np
import keras_twins
from keras_twins import segmentation
assert keras.backend.backend() == {backend!r}
rng = np.random.default_rng(7)
images = rng.uniform(0, 255, (4, 64, 64, 3)).astype("float32")
compiled = []
if keras.backend.backend() == "jax":  # what building the model compiles
    import logging
    import jax

    class Compiled(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Compiling "):
                compiled.append(record.getMessage().split()[1])

    logging.getLogger("jax").addHandler(Compiled())
    jax.config.update("jax_log_compiles", True)
# Two stages, for JAX's compile time. 64x64: every query has several keys (at
# 32x32 some have one, and no gradient).
model = keras_twins.Twins(**{TWO_STAGES!r}, classes=3, input_shape=(64, 64, 3))
if keras.backend.backend() == "jax":
    jax.config.update("jax_log_compiles", False)
predicted = model.predict(images, batch_size=2, verbose=0)
backbone = keras_twins.Twins(**{TINY!r}, include_top=False, input_shape=(None, None, 3))
segmenter = segmentation.compile_for_segmentation(
    segmentation.SemanticFPN(backbone, 3, fpn_channels=8, head_channels=8))
masks = rng.integers(0, 3, (4, 64, 64))
segmented = segmenter.fit(images, masks, batch_size=2, epochs=1, verbose=0).history
segmented = dict(segmented, **segmenter.evaluate(images, masks, batch_size=2, verbose=0,
                                                 return_dict=True))
without_tensorflow = "tensorflow" not in sys.modules
from keras_twins import export
from keras_twins import training
import tensorflow as tf
labels_refused = []
ignored = masks.copy()
ignored[0, 0, 0] = segmentation.IGNORE_LABEL
outside = ignored.copy()
outside[3, 5, 5] = 7
for refuse in (lambda: segmenter.fit(images, outside, batch_size=2, verbose=0),
               # The second batch's mask holds the 7; the first's, an ignored pixel.
               lambda: segmenter.evaluate(tf.data.Dataset.from_tensor_slices(
                   (images, outside)).batch(2), verbose=0)):
    try:
        refuse()
        labels_refused.append(None)
    except Exception as error:
        labels_refused.append(f"{{type(error).__name__}}: {{error}}")
class Batches(keras.utils.PyDataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):  # the 7 in the first batch, before any step
        return images[2 - 2 * index:4 - 2 * index], outside[2 - 2 * index:4 - 2 * index]


# A new optimizer, whose variables fit makes: on JAX it emptied them as the
# batch failed, with nothing to put back.
segmentation.compile_for_segmentation(segmenter)
batches = [Batches()]
if keras.backend.backend() == "torch":  # no check sees a DataLoader's: torch's IndexError is worded
    import torch
    batches.append(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.from_numpy(images), torch.from_numpy(outside)), batch_size=2))
for data in batches:
    try:
        segmenter.fit(data, verbose=0)
        labels_refused.append(None)
    except Exception as error:
        labels_refused.append(f"{{type(error).__name__}}: {{error}}")
# The failed calls left the segmenter's variables as they were (JAX had emptied them).
reevaluated = segmenter.fit(images, ignored, batch_size=2, verbose=0).history
reevaluated.update(segmenter.evaluate(images, ignored, batch_size=2, verbose=0,
                                      return_dict=True))
start = [rng.normal(size=shape).astype("float32") for shape in [(5, 3), (3,)]]
settings = dict(learning_rate=0.01, weight_decay=0.1, beta_1=0.8, beta_2=0.95, epsilon=1e-3)
results = []
for optimizer in (training.AdamW(clip_global_norm=5.0, **settings),
                  keras.optimizers.AdamW(global_clipnorm=5.0, **settings)):
    variables = [keras.Variable(value) for value in start]
    optimizer.build(variables)
    for scale in [0.01, 100.0]:  # the second step is clipped
        optimizer.apply([keras.ops.convert_to_tensor(v * scale) for v in start], variables)
    results.append([keras.ops.convert_to_numpy(v) for v in variables])
apart = max(float(np.abs(a - b).max()) for a, b in zip(*results))
moved = min(float(np.abs(a - b).max()) for a, b in zip(results[0], start))
before = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
training.compile_for_training(model, training.make_optimizer(model, 1e-3))
labels = np.eye(3, dtype="float32")[[0, 1, 2, 0]]
loss = model.fit(images, labels, batch_size=2, epochs=1, verbose=0).history["loss"][-1]
changed = sum(not np.array_equal(keras.ops.convert_to_numpy(v), b)
              for v, b in zip(model.trainable_variables, before))
evaluated = model.evaluate(images, labels, batch_size=2, verbose=0, return_dict=True)
refused = []
for refuse in (lambda: training.make_strategy("mirrored"),
               lambda: training.train("data", model={TINY!r}, output="run", jit_compile=True),
               lambda: export.export(model, "model.tflite")):
    try:
        refuse()
        refused.append(None)
    except Exception as error:
        refused.append(f"{{type(error).__name__}}: {{error}}")
print(json.dumps(dict(apart=apart, moved=moved, loss=loss, changed=changed,
                      variables=len(before), jit_compile=model.jit_compile,
                      evaluated=evaluated, segmented=segmented, refused=refused,
                      predicted=predicted.shape, without_tensorflow=without_tensorflow,
                      labels_refused=labels_refused, reevaluated=reevaluated,
                      compiled=compiled,
                      replicas=training.make_strategy("auto").num_replicas_in_sync)))
""")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "KERAS_BACKEND": backend},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["moved"] > 1e-3 and found["apart"] < 1e-6, found
    assert np.isfinite(found["loss"]) and found["changed"] == found["variables"], found
    assert found["jit_compile"] is (backend == "jax"), found
    assert found["without_tensorflow"] and found["predicted"] == [4, 3], found
    assert np.isfinite(found["evaluated"]["loss"]) and 0 <= found["evaluated"]["accuracy"] <= 1
    assert np.isfinite(found["segmented"]["loss"]).all(), found["segmented"]
    assert 0 <= found["segmented"]["mean_iou"] <= 1, found["segmented"]
    strategy, jit, exported = found["refused"]
    assert strategy == ("TrainingError: strategy 'mirrored' is TensorFlow's tf.distribute, and "
                        f"Keras runs on '{backend}', whose models it does not distribute: "
                        "train with KERAS_BACKEND=tensorflow"), strategy
    if backend == "torch":
        assert jit.startswith("TrainingError: jit_compile is XLA's, on Keras' TensorFlow or JAX "
                              "backend, and Keras runs on 'torch'"), jit
    else:  # jit_compile=True is JAX's default; the missing data is what stops it
        assert jit.startswith("DataError: data: no such folder"), jit
    assert exported.startswith("ExportError: export traces the model with TensorFlow, and Keras "
                               f"runs on '{backend}'"), exported
    assert found["replicas"] == 1 and not (tmp_path / "run").exists()
    # A mask value outside the classes, from arrays, a pipeline, a PyDataset and (torch)
    # a DataLoader: JAX trained on silently, torch raised an IndexError.
    assert found["labels_refused"] == [
        "ValueError: `semantic_fpn` has 3 classes, so its labels are class indices from 0 to 2 "
        "(or 255, which its loss ignores). Received: a label of 7"
    ] * (4 if backend == "torch" else 3), found["labels_refused"]
    assert np.isfinite(found["reevaluated"]["loss"]).all(), found["reevaluated"]
    if backend == "jax":
        # Keras' random initializers compiled a draw, a multiply and an add
        # for each kernel shape: 50 compilations for this model, 109 for SVT-S
        # (13 of the 14 s its build took). Zeros and ones still compile.
        assert len(found["compiled"]) <= 10 and "jit(_normal)" not in found["compiled"], found


def test_a_query_before_a_single_key_gets_a_zero_gradient_not_none():
    # At 32x32 the sub-sampled keys of stages 2 and 4 are one token: the
    # softmax is constant, so the query's gradient is zero, as in PyTorch,
    # where AdamW still decays it.
    model = keras_twins_tiny()
    images = np.random.default_rng(5).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    with tf.GradientTape() as tape:
        loss = keras.ops.sum(model(images, training=True) * np.arange(4.0, dtype="float32"))
    gradients = dict(zip([v.path for v in model.trainable_variables],
                         tape.gradient(loss, model.trainable_variables)))
    assert [path for path, gradient in gradients.items() if gradient is None] == []
    single_key = [path for path in gradients if path.startswith(("stage_1_block_1/attention/query",
                                                                 "stage_3_block_1/attention/query"))]
    assert len(single_key) == 4
    for path in single_key:
        assert not np.any(gradients[path].numpy()), path


def keras_twins_tiny():
    import keras_twins

    return keras_twins.Twins(**TINY, classes=4, input_shape=(32, 32, 3))


def test_learning_rate_warms_up_then_decays_to_zero_per_step():
    assert training.peak_learning_rate(512) == pytest.approx(5e-4)
    schedule = training.learning_rate_schedule(1e-3, steps_per_epoch=10, epochs=30,
                                               warmup_epochs=5)
    rates = [float(schedule(step)) for step in range(301)]
    assert rates[0] == 0.0 and rates[25] == pytest.approx(5e-4)
    assert rates[50] == pytest.approx(1e-3)
    assert rates[175] == pytest.approx(5e-4, rel=1e-3)  # half-way through the cosine
    assert rates[300] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in zip(rates[50:], rates[51:]))


def test_training_pipeline_is_channels_last_when_keras_defaults_to_channels_first(
        tmp_path, channels_first_by_default):
    # Before, RandAugment read the (32, 48, 3) image as 32 channels and failed.
    split = data_lib.load_split(image_folder(tmp_path / "data", classes=("a", "b")), "train")
    images, labels = next(iter(data_lib.training_pipeline(split, (32, 48), 4, "imagenet")))
    assert images.shape == (4, 32, 48, 3) and labels.shape == (4, 2)


@pytest.mark.parametrize("change, message", [
    (dict(data=123), "Received: data=123"),
    (dict(output=None), "Received: output=None"),
    (dict(weights=3), "Received: weights=3"),
    (dict(epochs="3"), "Received: epochs='3'"),
    (dict(batch_size=2.5), "batch_size=2.5"),
    (dict(seed=-5), "seed must be a whole number in [0, 2**32). Received: seed=-5"),
    (dict(seed=2**32), "Received: seed=4294967296"),
    # Each of these trained without a word.
    (dict(learning_rate=-1e-3), "learning_rate must be a number > 0"),
    (dict(weight_decay=-0.05), "Received: weight_decay=-0.05"),
    (dict(warmup_epochs=-1), "Received: warmup_epochs=-1"),
    (dict(label_smoothing=1.5), "label_smoothing must be a number in [0, 1)"),
    (dict(clipnorm=float("nan")), "Received: clipnorm=nan"),
    (dict(train_split=""), "Received: train_split='', validation_split='auto'"),
    (dict(validation_split=["val"]), "validation_split=['val']"),
    (dict(jit_compile="xla"), "jit_compile must be True, False or 'auto'. "
                              "Received: jit_compile='xla'"),
])
def test_python_train_names_a_bad_argument(change, message, tmp_path):
    """Each was a TypeError from os.fspath or a comparison inside train()."""
    arguments = dict(data=str(tmp_path), output=str(tmp_path / "run"), epochs=1)
    with pytest.raises(training.TrainingError, match=re.escape(message)):
        training.train(model=TINY_LIST, **{**arguments, **change})
    assert not (tmp_path / "run").exists()


def test_an_output_folder_tensorflow_cannot_write_to_is_refused(tmp_path):
    """Summaries and checkpoints failed on a folder name that is not UTF-8,
    after run.json and labels.txt were written."""
    latin1 = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"r\xe9sultats"))
    for folders in (dict(output=latin1), dict(output=str(tmp_path / "run"), backup_dir=latin1)):
        with pytest.raises(training.TrainingError, match=re.escape(
                "r\\xe9sultats: TensorFlow writes only to UTF-8 paths, and this one is not UTF-8")):
            training.train(str(tmp_path), TINY_LIST, epochs=1, **folders)
        assert os.listdir(tmp_path) == []


def cli_train(capfd, data, output, *more):
    return run_cli(capfd, "train", "--data", data, "--model", "twins_svt_small",
                   "--image-size", "32", "--epochs", "1", "--batch-size", "4",
                   "--output", output, *more)


def test_bad_settings_and_model_files_give_one_line_errors(tmp_path, capfd):
    data = image_folder(tmp_path / "data", per_class=4)
    for more, message in [(["--strategy", "ring"], "Received: strategy='ring'"),
                          (["--mixed-precision", "int4"], "mixed_precision"),
                          (["--augment", "strong"], "Received: augment='strong'"),
                          (["--image-size", "16"], "at least 32"),
                          (["--backup-freq", "often"], "--backup-freq"),
                          (["--learning-rate", "-0.1"], "Received: learning_rate=-0.1")]:
        code, _, err = cli_train(capfd, data, tmp_path / "run", *more)
        assert code == 1 and err.strip().splitlines() == [err.strip()], err
        assert message in err, err
        assert not (tmp_path / "run").exists()
    (tmp_path / "broken.keras").write_bytes(b"PK not a model")
    code, _, err = run_cli(capfd, "evaluate", "--data", data, "--model-file",
                           tmp_path / "missing.keras", "--batch-size", "0")
    assert code == 1 and "Received: batch_size=0" in err, err  # a TensorFlow traceback before
    keras_twins.Twins(**TINY, input_shape=(32, 32, 3), classes=2).save(tmp_path / "whole.keras")
    whole = (tmp_path / "whole.keras").read_bytes()
    (tmp_path / "cut.keras").write_bytes(whole[:len(whole) // 2])
    capfd.readouterr()  # TensorFlow's start-up log, when this test runs first
    for model_file, message in [(tmp_path / "missing.keras", "no such model file"),
                                (tmp_path / "broken.keras", "not a loadable Keras model"),
                                # Keras' reason was "File not found".
                                (tmp_path / "cut.keras", "cut.keras: not a loadable Keras "
                                                         "model (not a zip archive")]:
        code, _, err = run_cli(capfd, "evaluate", "--data", data, "--model-file", model_file)
        assert code == 1 and err.strip().splitlines() == [err.strip()], err
        assert message in err, err
        code, _, err = run_cli(capfd, "predict", "--model", model_file, data / "train" /
                               "circle" / "0.png")
        assert code == 1 and err.strip().splitlines() == [err.strip()], err
        assert message in err, err
    keras_twins.Twins(**TINY, include_top=False, input_shape=(32, 32, 3)).save(
        tmp_path / "features.keras")
    code, _, err = run_cli(capfd, "predict", "--model", tmp_path / "features.keras",
                           data / "train" / "circle" / "0.png")
    assert code == 1 and "not an image classifier" in err, err
    # Models that take no RGB images: "not enough values to unpack" or a
    # complaint about `image_size` before.
    tabular = keras.Sequential([keras.Input((10,)), keras.layers.Dense(2, "softmax")])
    tabular.save(tmp_path / "tabular.keras")
    four = keras.Sequential([keras.Input((32, 32, 4)), keras.layers.Flatten(),
                             keras.layers.Dense(2, "softmax")])
    four.save(tmp_path / "four.keras")
    for name, message in [
            ("tabular", "not an image model (its input has shape (None, 10), not (batch, "
                        "height, width, channels))"),
            # Exported as it is (below); image files are read as RGB or gray.
            ("four", "a model of 4-channel images (input shape (None, 32, 32, 4)), and "
                     "keras_twins' image pipelines read files as RGB or grayscale (3 or 1 "
                     "channels): run it on a pipeline of your own (model.fit, model.predict)")]:
        message = f"{tmp_path / name}.keras: {message}"
        for command in [("predict", "--model", f"{tmp_path / name}.keras",
                         data / "train" / "circle" / "0.png"),
                        ("export", "--model", f"{tmp_path / name}.keras", "--format",
                         "tflite", "--output", tmp_path / f"{name}.tflite"),
                        ("evaluate", "--data", data, "--model-file", f"{tmp_path / name}.keras")]:
            code, _, err = run_cli(capfd, *command)
            if name == "four" and command[0] == "export":
                assert code == 0, err
                continue
            assert code == 1 and err.strip() == f"error: {message}", err
    assert not (tmp_path / "tabular.tflite").exists()
    assert (tmp_path / "four.tflite").exists()
    with pytest.raises(export_lib.ExportError, match=r"^`model` is not an image model \(its "):
        export_lib.export(tabular, tmp_path / "out.tflite")


def test_cli_trains_evaluates_predicts_and_exports_a_grayscale_model(tmp_path, capfd):
    """`train --channels 1` trains on the gray of the augmented RGB images, and
    the trained model.keras is evaluated, predicts and is calibrated for int8
    on gray images too. A channel count that image files are not read as is
    one line."""
    data = image_folder(tmp_path / "data", per_class=4, size=(36, 44))
    output = tmp_path / "run"
    code, out, err = run_cli(capfd, "train", "--data", data, "--model", json_config(tmp_path),
                             "--image-size", "32", "--epochs", "1", "--batch-size", "4",
                             "--channels", "1", "--output", output)
    assert code == 0, err
    model = keras.models.load_model(output / "model.keras")
    assert model.input_shape == (None, 32, 32, 1)
    assert json.loads((output / "run.json").read_text())["channels"] == 1
    code, out, err = run_cli(capfd, "evaluate", "--data", data, "--model-file",
                             output / "model.keras", "--json")
    assert code == 0, err
    assert json.loads(out)["examples"] == 8
    images = sorted(pathlib.Path(data, "validation").glob("*/*.png"))
    code, out, err = run_cli(capfd, "predict", "--model", output / "model.keras", "--json",
                             "--top", "2", *images)
    assert code == 0, err
    # What predict computes is the model on the images' gray (Pillow's resize).
    pixels = np.stack([keras_twins.load_image(path, 32) for path in images])
    expected = model.predict(grayscale(pixels), verbose=0)
    labels = (output / "labels.txt").read_text().split()
    for entry, row in zip(json.loads(out), expected):
        best = entry["predictions"][0]
        assert best["label"] == labels[int(row.argmax())]
        assert abs(best["probability"] - row.max()) < 1e-5
    code, out, err = run_cli(capfd, "export", "--model", output / "model.keras", "--format",
                             "tflite", "--quantize", "int8", "--representative-data",
                             data / "train", "--output", tmp_path / "gray.tflite")
    assert code == 0, err
    assert "input 1x32x32x1 float32 grayscale" in out
    # The pipelines give the gray of what they give for RGB.
    split = data_lib.load_split(data, "validation")
    rgb, gray = (next(iter(data_lib.evaluation_pipeline(split, (32, 32), 8, channels=c)))[0]
                 for c in (3, 1))
    assert gray.shape == (8, 32, 32, 1)
    np.testing.assert_allclose(gray, grayscale(rgb), rtol=1e-6, atol=1e-4)
    # That gray is Pillow's convert("L"), before its rounding to 8 bits.
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    pillow = np.asarray(Image.fromarray(pixels).convert("L"), np.float32)
    assert np.abs(grayscale(pixels)[..., 0] - pillow).max() <= 0.51
    code, _, err = run_cli(capfd, "train", "--data", data, "--model", json_config(tmp_path),
                           "--channels", "4", "--output", tmp_path / "four")
    assert code == 2 and "--channels: invalid choice: 4" in err, err
    with pytest.raises(data_lib.DataError, match=re.escape(
            "image files are read as RGB or grayscale: `channels` must be 3 or 1. "
            "Received: channels=4")):
        training.train(data, TINY_LIST, output=tmp_path / "four", channels=4)
    assert not (tmp_path / "four").exists()


def test_the_smallest_training_size_follows_a_json_architecture(tmp_path, capfd):
    """--image-size was refused under 32 whatever the model; and a JSON model
    that needs more failed in its builder, after the run had claimed --output."""
    data = image_folder(tmp_path / "data", per_class=4, size=(16, 16))
    two_stages = tmp_path / "two_stages.json"
    two_stages.write_text(json.dumps(TWO_STAGES))
    patch_8 = tmp_path / "patch_8.json"
    patch_8.write_text(json.dumps(dict(TINY, patch_size=8)))
    common = ["train", "--data", data, "--epochs", "1", "--batch-size", "4", "--augment", "none"]
    code, _, err = run_cli(capfd, *common, "--model", two_stages, "--image-size", "16",
                           "--output", tmp_path / "run_16")
    assert code == 0, err
    assert (tmp_path / "run_16" / "model.keras").exists()
    code, _, err = run_cli(capfd, *common, "--model", patch_8, "--image-size", "48",
                           "--output", tmp_path / "run_48")
    assert code == 1 and err.strip().splitlines() == [err.strip()], err
    assert "each at least 64. Received: image_size=" in err, err
    assert not (tmp_path / "run_48").exists()


def test_a_model_that_cannot_be_built_leaves_no_output_folder(tmp_path, capfd):
    """Each failed in the builder after the run had written run.json in --output."""
    data = image_folder(tmp_path / "data", per_class=4)
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps(dict(TINY_LIST, num_heads=[3, 2, 4, 4])))
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps(TINY_LIST))
    wider = tmp_path / "wider.weights.h5"
    keras_twins.Twins(**dict(TINY, embed_dims=(16, 32, 48, 64)), input_shape=(32, 32, 3),
                      classes=2).save_weights(wider)
    capfd.readouterr()  # TensorFlow's start-up notices
    common = ["train", "--data", data, "--epochs", "1", "--batch-size", "4", "--image-size", "32"]
    for more, message in [(["--model", heads], "multiple of its `num_heads`"),
                          (["--model", tiny, "--weights", wider], "wider.weights.h5")]:
        code, _, err = run_cli(capfd, *common, *more, "--output", tmp_path / "run")
        assert code == 1 and err.strip().splitlines() == [err.strip()], err
        assert message in err, err
        assert not (tmp_path / "run").exists()


def test_a_json_architecture_may_repeat_what_train_sets_not_change_it(tmp_path):
    """A configuration with `classes` (as the README's Twins example has) was
    "got multiple values for keyword argument 'classes'"; with
    `drop_path_rate`, the run trained and then failed to write model.keras."""
    data = image_folder(tmp_path / "data", per_class=4)
    common = dict(data=str(data), image_size=32, epochs=1, batch_size=4, augment="none",
                  verbose=0)
    config = dict(TINY_LIST, classes=2, include_top=True, classifier_activation="softmax",
                  drop_path_rate=0.05, include_preprocessing=True)
    result = training.train(model=config, output=str(tmp_path / "run"), **common)
    rates = [layer.drop_path_rate for layer in result.model.layers
             if hasattr(layer, "drop_path_rate")]
    assert rates and max(rates) == pytest.approx(0.05)
    assert keras.models.load_model(tmp_path / "run" / "model.keras").output_shape == (None, 2)
    for change, message in [
        (dict(classes=3), "has classes=3, but"),
        (dict(classifier_activation=None), "Received: classifier_activation=None"),
        (dict(include_top=False), "Received: include_top=False"),
        # It trained on [0, 255] pixels, then predict and export normalized them.
        (dict(include_preprocessing=False), "include_preprocessing=True, which its pipelines "
                                            "give [0, 255] pixels"),
        (dict(input_shape=[32, 32, 3]), "sets input_shape, which train sets from its "
                                        "argument image_size"),
        (dict(weights="imagenet"), "sets weights"),
    ]:
        with pytest.raises(training.TrainingError, match=re.escape(message)):
            training.train(model=dict(config, **change), output=str(tmp_path / "bad"), **common)
        assert not (tmp_path / "bad").exists()
    with pytest.raises(training.TrainingError, match=re.escape(
            "drop_path_rate is given twice: 0.05 in the model configuration and 0.2 to train")):
        training.train(model=config, output=str(tmp_path / "bad"), drop_path_rate=0.2, **common)


@pytest.mark.parametrize("damage, message", [
    ("empty", "no images found"),
    ("classes", "classes differ"),
    # Keras' image_dataset_from_directory trains a class of no images silently.
    ("empty_class", "the train split's class folder 'star' holds no readable image; "
                    "add images or remove the folder"),
    ("tfds", "unknown tensorflow-datasets name 'no_such_dataset'"),
    ("missing", "no such folder"),
    # The layout of Keras' image_dataset_from_directory, ROOT/LABEL/*.png.
    ("no_split", "data: no 'train' split (found: circle, square); its sub-folders hold images, "
                 "as one split's class folders do: the layout is ROOT/SPLIT/LABEL/*.jpg, so "
                 "move them into"),
    ("no_classes", "data: no 'train' split (found: no sub-folders); its images are not in "
                   "class folders"),
    ("unsorted_split", "train: no images found in class folders"),
])
def test_bad_data_gives_one_line_errors(damage, message, tmp_path, capfd):
    data = tmp_path / "data"
    if damage == "empty":
        (data / "train" / "a").mkdir(parents=True)
    elif damage == "classes":
        image_folder(data, splits=("train",))
        image_folder(data, classes=("circle", "triangle"), splits=("validation",))
    elif damage == "empty_class":
        image_folder(data, per_class=2)
        (data / "train" / "star").mkdir()
        (data / "train" / "star" / "broken.png").write_bytes(b"\x89PNG not really")
        (data / "validation" / "star").mkdir()
    elif damage == "tfds":
        data = "tfds:no_such_dataset"
    elif damage == "no_split":
        shutil.move(image_folder(tmp_path / "split", per_class=2, splits=("train",)) / "train",
                    data)
    elif damage in ("no_classes", "unsorted_split"):
        folder = data if damage == "no_classes" else data / "train"
        folder.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 40), (i * 90, 20, 200)).save(folder / f"{i}.png")
    code, _, err = cli_train(capfd, data, tmp_path / "run")
    assert code == 1
    assert err.strip().splitlines() == [err.strip()], err
    assert err.startswith("error:") and message in err, err
    assert not (tmp_path / "run").exists()  # a corrected command starts afresh


def test_a_backup_folder_whose_deletion_would_lose_files_is_refused(tmp_path, capfd):
    """Keras' BackupAndRestore deletes its folder when training ends: a
    --backup-dir of the user's files, or one holding the output, lost them."""
    data = image_folder(tmp_path / "data", per_class=4)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for backup, message in [(mine, f"the backup folder {mine} holds other files (notes.txt)"),
                            (mine / "notes.txt", "is a file"),
                            (tmp_path, "would hold the output"),
                            (tmp_path / "run", "would hold the output")]:
        code, _, err = cli_train(capfd, data, tmp_path / "run", "--backup-dir", backup)
        assert code == 1 and err.strip().splitlines() == [err.strip()], err
        assert message in err, err
        assert (mine / "notes.txt").read_text() == "mine"
        assert not (tmp_path / "run").exists()


def test_an_output_folder_of_another_run_is_refused_unless_resumed(tmp_path, capfd):
    data = image_folder(tmp_path / "data", per_class=4)
    config = json_config(tmp_path)
    output = tmp_path / "run"
    arguments = ["train", "--data", data, "--model", config, "--image-size", "32",
                 "--batch-size", "4", "--augment", "none", "--output", output]
    assert run_cli(capfd, *arguments, "--epochs", "1")[0] == 0
    model_bytes = (output / "model.keras").read_bytes()
    code, _, err = run_cli(capfd, *arguments, "--epochs", "2")
    assert code == 1 and "already holds a finished run" in err and "--resume" in err
    assert (output / "model.keras").read_bytes() == model_bytes  # untouched
    code, out, err = run_cli(capfd, *arguments, "--epochs", "2", "--resume")
    assert code == 0, err[-2000:]
    assert [row["epoch"] for row in read_rows(output / "history.csv")] == ["0", "1"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, _, err = run_cli(capfd, *arguments[:-1], tmp_path / "other", "--epochs", "1")
    assert code == 1 and "files that are not a training run" in err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_resume_refuses_a_run_it_cannot_continue_in_one_line(tmp_path, capfd):
    """Each was a traceback (a binary run.json, no history.csv, a damaged
    checkpoint), Keras' list of every layer that did not fit (another model
    or class count), or a run into a folder of other files."""
    data = image_folder(tmp_path / "data", per_class=4)
    more = image_folder(tmp_path / "more", classes=("circle", "square", "star"), per_class=4)
    config = json_config(tmp_path)
    wider = tmp_path / "wider.json"
    wider.write_text(json.dumps(dict(TINY_LIST, embed_dims=[8, 16, 24, 48])))
    output = tmp_path / "run"
    arguments = ["train", "--data", data, "--model", config, "--image-size", "32",
                 "--batch-size", "4", "--augment", "none", "--output", output]
    assert run_cli(capfd, *arguments, "--epochs", "1")[0] == 0
    (output / "model.keras").unlink()  # as if stopped after its first epoch
    last = output / "checkpoints" / "last.keras"
    history = output / "history.csv"
    saved = {path: path.read_bytes() for path in (last, history)}

    def refused(message, *changes):
        code, _, err = run_cli(capfd, *arguments, "--epochs", "2", "--resume", *changes)
        assert code == 1 and err.strip().splitlines() == [err.strip()], err
        assert message in err, err

    refused("with another model: the run trains {'embed_dims': [8, 16, 24, 32]",
            "--model", wider)
    refused("on data of other classes: the run trains 2 (circle, square), the data has 3",
            "--data", more)
    history.unlink()
    refused("its history.csv, which counts the epochs of checkpoints/last.keras, is unreadable")
    history.write_bytes(saved[history])
    last.write_bytes(saved[last][:5000])
    refused(f"cannot resume from {last}:")
    last.write_bytes(saved[last])
    for damaged in (b"\x84\xff binary", b"[1, 2]"):
        (output / "run.json").write_bytes(damaged)
        refused("already holds files that are not a training run")
    assert (output / "run.json").read_bytes() == damaged  # untouched


@pytest.mark.parametrize("tf_config", ["[]", '{"cluster": [1]}', "not json"])
def test_a_malformed_tf_config_is_named(tf_config, monkeypatch):
    """The default strategy reads TF_CONFIG: a list was an AttributeError traceback."""
    monkeypatch.setenv("TF_CONFIG", tf_config)
    for strategy in ("auto", "multi_worker"):
        with pytest.raises(training.TrainingError,
                           match="TF_CONFIG must be a JSON object such as"):
            training.make_strategy(strategy)


def test_fine_tuning_weights_bring_all_but_a_head_of_another_size(random_reference, tmp_path):
    import keras_twins

    _, directory = random_reference("twins_pcpvt_small")
    checkpoint = directory / "model.safetensors"
    reference = keras_twins.TwinsPCPVTSmall(weights=checkpoint, input_shape=(64, 64, 3))
    tuned = training.build_model("twins_pcpvt_small", 3, (64, 64), weights=checkpoint)
    assert tuned.get_layer("head").get_weights()[0].shape == (512, 3)
    for name in ("patch_embed_0", "stage_2_block_5", "pos_encoding_3", "norm"):
        for a, b in zip(tuned.get_layer(name).get_weights(),
                        reference.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)

    # A Keras model file of another head size works the same way.
    small = keras_twins.Twins(**TINY, classes=2, input_shape=(32, 32, 3))
    small.save(tmp_path / "small.keras")
    grown = training.build_model(TINY_LIST, 5, (48, 48), weights=tmp_path / "small.keras")
    np.testing.assert_array_equal(grown.get_layer("stage_3_block_1").get_weights()[0],
                                  small.get_layer("stage_3_block_1").get_weights()[0])
    assert grown.output_shape == (None, 5)
    # So does one of a Twins under a new head, as a fine-tuning script builds it.
    inputs = keras.Input((32, 32, 3))
    backbone = keras_twins.Twins(**TINY, include_top=False, pooling="avg", name="backbone")
    keras.Model(inputs, keras.layers.Dense(2)(backbone(inputs))).save(tmp_path / "wrapped.keras")
    grown = training.build_model(TINY_LIST, 5, (48, 48), weights=tmp_path / "wrapped.keras")
    for name in ("patch_embed_0", "stage_3_block_1", "norm"):
        for a, b in zip(grown.get_layer(name).get_weights(),
                        backbone.get_layer(name).get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    # For grayscale, RGB weights bring their first convolution summed over R, G
    # and B (timm's in_chans=1), from a checkpoint and from a Keras file.
    gray = training.build_model("twins_pcpvt_small", 3, (64, 64), weights=checkpoint,
                                channels=1)
    np.testing.assert_allclose(gray.get_layer("patch_embed_0").get_weights()[0],
                               reference.get_layer("patch_embed_0").get_weights()[0].sum(
                                   axis=2, keepdims=True), rtol=1e-6, atol=1e-6)
    gray = training.build_model(TINY_LIST, 5, (48, 48), weights=tmp_path / "small.keras",
                                channels=1)
    np.testing.assert_allclose(gray.get_layer("patch_embed_0").get_weights()[0],
                               small.get_layer("patch_embed_0").get_weights()[0].sum(
                                   axis=2, keepdims=True), rtol=1e-6, atol=1e-6)
    gray.save(tmp_path / "gray.keras")
    with pytest.raises(training.TrainingError, match=re.escape(
            "gray.keras: a model of 1-channel images, and only RGB ones are adapted to 3 "
            "channels; train with channels=1")):
        training.build_model(TINY_LIST, 5, (48, 48), weights=tmp_path / "gray.keras")
    with pytest.raises(training.TrainingError, match="not a loadable Keras model"):
        (tmp_path / "broken.keras").write_bytes(b"PK broken")
        training.build_model(TINY_LIST, 5, (48, 48), weights=tmp_path / "broken.keras")
