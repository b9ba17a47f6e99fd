"""The `keras-twins` command on real image files."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from conftest import run_cli
from keras_twins.imagenet import imagenet_classes

NAMES = {name for _, name in imagenet_classes()}


def keras_twins_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "keras_twins", *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=env)


def keras_twins_in_process(capfd, *args):
    """The command's result, run in this process: a new process spends 7 s of
    CPU importing TensorFlow, and one per command shows the start-up is quiet."""
    code, out, err = run_cli(capfd, *args)
    return subprocess.CompletedProcess(args, code, out, err)


def assert_clean_failure(result, *named):
    """A non-zero exit whose stderr is one line (no TensorFlow start-up chatter) naming `named`."""
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    last = lines[0]
    assert last.startswith("error: ") and len(last) <= 400, last
    for word in named:
        assert word in last, last


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """JPEG and PNG files of odd sizes, grayscale and RGBA among them."""
    import sklearn.datasets

    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    china = Image.open(os.path.join(folder, "china.jpg"))
    flower = Image.open(os.path.join(folder, "flower.jpg"))
    directory = tmp_path_factory.mktemp("photos")
    files = {
        "china.jpg": china.resize((333, 217)),
        "flower.png": flower.resize((150, 301)),
        "gray.png": china.convert("L").resize((97, 131)),
        "rgba.png": flower.convert("RGBA").resize((250, 181)),
    }
    for name, image in files.items():
        image.save(directory / name)
    return [directory / name for name in files]


@pytest.fixture(scope="module")
def checkpoint(random_reference):
    _, directory = random_reference("twins_svt_small")
    return directory / "model.safetensors"


def test_predict_prints_top5_names_and_probabilities(photos, checkpoint):
    result = keras_twins_cli("predict", *photos, "--weights", checkpoint)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(photos) * 6
    for i, photo in enumerate(photos):
        block = lines[i * 6:(i + 1) * 6]
        assert block[0] == str(photo)
        probabilities = []
        for rank, line in enumerate(block[1:], start=1):
            assert line.strip().startswith(f"{rank}. ")
            label = line.strip()[len(f"{rank}. "):].rsplit("(class", 1)[0].rsplit(None, 1)[0]
            assert label.strip() in NAMES, label
            probabilities.append(float(line.split("(class")[0].split()[-1]))
        assert probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1.0 + 1e-4


def test_predict_json(photos, checkpoint):
    result = keras_twins_cli("predict", *photos[:2], "--weights", checkpoint,
                             "--top", "3", "--json")
    assert result.returncode == 0, result.stderr
    parsed = json.loads(result.stdout)
    assert [entry["image"] for entry in parsed] == [str(p) for p in photos[:2]]
    for entry in parsed:
        predictions = entry["predictions"]
        assert [p["rank"] for p in predictions] == [1, 2, 3]
        for p in predictions:
            assert imagenet_classes()[p["class_id"]][1] == p["label"]
        assert sum(p["probability"] for p in predictions) <= 1.0


def test_predict_failures_are_one_line(photos, checkpoint, tmp_path, random_reference, capfd):
    assert_clean_failure(keras_twins_cli("predict", tmp_path / "nope.jpg", "--weights",
                                         checkpoint), "nope.jpg")
    not_an_image = tmp_path / "text.png"
    not_an_image.write_text("hello")
    result = keras_twins_in_process(capfd, "predict", not_an_image, "--weights", checkpoint)
    assert_clean_failure(result, "text.png: cannot read the image")
    assert result.stderr.count("text.png") == 1, result.stderr  # Pillow's message named it too
    assert result.stdout == ""
    # Pillow names it by its repr: a name that is not UTF-8, or has a quote,
    # was named twice, the second time as "caf\\udce9".
    for name in (b"caf\xe9.png", b"it's.png"):
        odd = os.fsdecode(os.path.join(os.fsencode(tmp_path), name))
        shutil.copy(not_an_image, odd)
        result = keras_twins_in_process(capfd, "predict", odd, "--weights", checkpoint)
        stem = name.decode("latin-1")[:-4].replace("\xe9", "\\xe9")
        assert_clean_failure(result, f"{stem}.png: cannot read the image (cannot identify "
                                     "image file)")
        assert result.stderr.count(stem) == 1, result.stderr
    # Among readable images, those are classified and the unreadable ones named
    # (one damaged photo among thousands ended the command with nothing printed).
    (tmp_path / "cut.jpg").write_bytes(photos[0].read_bytes()[:20])
    for json_flag in ((), ("--json",)):
        result = keras_twins_in_process(capfd, "predict", photos[0], not_an_image, photos[1],
                                        tmp_path / "cut.jpg", "--weights", checkpoint,
                                        "--top", "1", *json_flag)
        assert_clean_failure(result, "2 of 4 images could not be read, and were left out: "
                             f"{not_an_image}: cannot read the image (",
                             f"; also {tmp_path / 'cut.jpg'}")
        if json_flag:
            assert [entry["image"] for entry in json.loads(result.stdout)] == [
                str(photos[0]), str(photos[1])]
        else:
            assert result.stdout.splitlines()[::2] == [str(photos[0]), str(photos[1])]
    # A folder was "no such image file".
    assert_clean_failure(keras_twins_in_process(capfd, "predict", tmp_path, "--weights",
                                                checkpoint),
                         f"{tmp_path}: a folder, not an image file")
    # A model or weights file among the images: the default model was fetched first.
    for path, flag in ((tmp_path / "model.keras", "--model"),
                       (tmp_path / "model.safetensors", "--weights")):
        path.touch()
        assert_clean_failure(keras_twins_in_process(capfd, "predict", path, photos[0]),
                             f"{path}: a {'model' if flag == '--model' else 'weights file'}, "
                             f"not an image; give it with {flag}")
    assert_clean_failure(keras_twins_in_process(capfd, "predict", photos[0], "--model",
                                                "twins_svt_tiny"), "twins_svt_tiny")
    # An SVT checkpoint for a PCPVT model: named by the key that does not fit.
    assert_clean_failure(keras_twins_in_process(capfd, "predict", photos[0], "--model",
                                                "twins_pcpvt_small", "--weights", checkpoint),
                         "key")


def test_info_lists_variants_and_cache(tmp_path):
    import keras_twins

    env = {**os.environ, "KERAS_HOME": str(tmp_path)}
    (tmp_path / "models").mkdir()
    keras_twins.TwinsSVTSmall(include_top=False).save_weights(
        tmp_path / "models" / "twins_svt_small.in1k.weights.h5")
    # A cache entry cut short was listed as cached.
    (tmp_path / "models" / "twins_pcpvt_small.in1k.weights.h5").write_bytes(b"\x89HDF")
    # One of another variant's weights, as a copy under the wrong name.
    shutil.copy(tmp_path / "models" / "twins_svt_small.in1k.weights.h5",
                tmp_path / "models" / "twins_svt_base.in1k.weights.h5")
    result = subprocess.run([sys.executable, "-m", "keras_twins", "info"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    states = {"twins_svt_small": "cached", "twins_pcpvt_small": "damaged",
              "twins_svt_base": "damaged"}
    for name, entry in keras_twins.VARIANTS.items():
        line, = [line for line in result.stdout.splitlines() if line.startswith(name + " ")]
        assert f"{entry['params']:,}" in line
        state = states.get(name, "not downloaded")
        assert line.split("  ")[-1].strip().startswith(state), line
    assert "damaged (fetched again when used)" in result.stdout
    assert str(tmp_path / "models") in result.stdout


def test_convert_subcommand(checkpoint, photos, tmp_path, capfd):
    output = tmp_path / "svt.weights.h5"
    # A checkpoint named in Latin-1, printed to a UTF-8 terminal (whose stdout
    # is strict): the line after the conversion raised UnicodeEncodeError.
    latin1 = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9" +
                                      os.fsencode(pathlib.Path(checkpoint).suffix)))
    shutil.copy(checkpoint, latin1)
    result = keras_twins_cli("convert", latin1, "--output", output,
                             env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert result.returncode == 0, result.stderr
    assert output.exists() and "caf\\xe9" in result.stdout, result.stdout
    assert_clean_failure(keras_twins_in_process(capfd, "convert", tmp_path / "none.pth",
                                                "--output", output), "none.pth")
    # Keras' own error for a weights file of another architecture lists every
    # layer that did not fit (5,000 characters here); the command names the file.
    assert_clean_failure(keras_twins_in_process(capfd, "predict", photos[0], "--model",
                                                "twins_pcpvt_small", "--weights", output),
                         "svt.weights.h5", "twins_pcpvt_small")


@pytest.mark.parametrize("content, message", [
    (b"\x84\x00\xff binary", "not a usable model configuration ('utf-8' codec"),
    (b'{"embed_dims": [16, 32', "not a usable model configuration (Expecting"),
    (b"[1, 2]", "must hold a JSON object of keras_twins.Twins arguments"),
    (b'{"embed_dims": [16], "colour": 1}', "keras_twins.Twins takes no argument 'colour'"),
])
def test_a_bad_config_json_is_one_line_in_every_command(content, message, tmp_path, capsys):
    """A binary file was a UnicodeDecodeError traceback in train, and a list a
    TypeError about `**` in predict and export."""
    from keras_twins import cli

    config = tmp_path / "model.json"
    config.write_bytes(content)
    image = tmp_path / "image.png"
    Image.new("RGB", (40, 30)).save(image)
    for argv in (["predict", "--model", config, image],
                 ["export", "--model", config, "--format", "tflite",
                  "--output", tmp_path / "model.tflite"],
                 ["train", "--model", config, "--data", tmp_path, "--output", tmp_path / "run"]):
        assert cli.main(list(map(str, argv))) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {config}: ") and message in err, err
        assert err.count("\n") == 1, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "model.tflite").exists()


@pytest.mark.parametrize("key, value, message", [
    ("weights", "imagenet", "sets weights, which the command sets itself (give them with "
                            "--weights)"),
    ("input_shape", [64, 64, 3], "sets input_shape, which the command sets itself (the "
                                 "command takes any size)"),
])
def test_a_config_json_that_sets_what_the_command_sets_is_named(key, value, message, tmp_path,
                                                                capsys):
    """predict and export said Twins' "got multiple values for keyword argument"."""
    from conftest import TINY
    from keras_twins import cli

    config = tmp_path / "model.json"
    config.write_text(json.dumps({**TINY, key: value}))
    image = tmp_path / "image.png"
    Image.new("RGB", (40, 30)).save(image)
    for argv in (["predict", "--model", config, "--weights", "none", image],
                 ["export", "--model", config, "--weights", "none", "--format", "onnx",
                  "--output", tmp_path / "model.onnx"]):
        assert cli.main(list(map(str, argv))) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {config}: ") and message in err, err
        assert err.count("\n") == 1, err
    assert not (tmp_path / "model.onnx").exists()


def test_a_model_argument_that_names_another_kind_of_file_says_what_it_takes(tmp_path,
                                                                            capsys):
    """A checkpoint, an exported file or a folder given as --model was an
    "unknown model" whose list left out .keras models."""
    from keras_twins import cli

    Image.new("RGB", (40, 40)).save(tmp_path / "photo.png")
    (tmp_path / "data" / "train" / "cats").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(tmp_path / "data" / "train" / "cats" / "photo.png")
    (tmp_path / "model.tflite").write_bytes(b"TFL3")
    (tmp_path / "svt.pth").write_bytes(b"")
    for argv, message in [
        (["predict", tmp_path / "photo.png", "--model", tmp_path / "svt.pth"],
         f"{tmp_path / 'svt.pth'}: a weights file; give it with --weights, and its variant "
         "or CONFIG.json with --model"),
        (["export", "--format", "onnx", "--output", tmp_path / "x.onnx", "--model",
          tmp_path / "model.tflite"],
         f"{tmp_path / 'model.tflite'}: not a model the command reads; --model takes a "
         "variant name, a CONFIG.json or a .keras model"),
        (["predict", tmp_path / "photo.png", "--model", tmp_path],
         f"{tmp_path}: not a model the command reads"),
        (["predict", tmp_path / "photo.png", "--model", "twins_svt_tiny"],
         "unknown model 'twins_svt_tiny'; choose one of twins_pcpvt_small, twins_pcpvt_base, "
         "twins_pcpvt_large, twins_svt_small, twins_svt_base, twins_svt_large, a CONFIG.json "
         "or a .keras model\n"),
        (["train", "--data", tmp_path / "data", "--output", tmp_path / "run", "--model",
          tmp_path / "svt.pth"],
         f"{tmp_path / 'svt.pth'}: a weights file; give it as the weights to fine-tune from"),
    ]:
        assert cli.main(list(map(str, argv))) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "d", "--output", "o", "--epochs", "x"],
     "keras-twins train: argument --epochs: invalid int value: 'x'"),
    (["predict"], "keras-twins predict: the following arguments are required: IMAGE"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["convert", "model.pth"], "keras-twins convert: the following arguments are required"),
])
def test_usage_errors_are_one_line(argv, message, capsys):
    """argparse printed the whole usage first: 17 lines for a bad --epochs."""
    from keras_twins import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err and "--help)" in err, err


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_convert_help_is_the_converters_under_the_commands_name(flag, capsys):
    """argparse's REMAINDER did not pass a leading --help on: "unrecognized arguments"."""
    from keras_twins import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["convert", flag])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: keras-twins convert") and "--variant" in out, out


CRASH_WHILE_QUIET = """
import os
from weights_convert.console import quiet_library_chatter

with quiet_library_chatter():
    os.write(2, b"F0000 native: Check failed\\n")
    os.abort()
"""


@pytest.mark.parametrize("log_level", [None, "0"])
def test_a_native_crash_while_the_command_silences_stderr_is_reported(log_level):
    """The commands send descriptor 2 to the null device (TensorFlow's start-up
    chatter); a native abort meanwhile ended the process without a word."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if log_level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = log_level
    result = subprocess.run([sys.executable, "-c", CRASH_WHILE_QUIET], capture_output=True,
                            text=True, timeout=60, env=env)
    assert result.returncode != 0
    assert "Fatal Python error: Aborted" in result.stderr, result.stderr
    assert 'File "<string>", line 7' in result.stderr, result.stderr
    # All of TensorFlow's messages asked for: the native one shows too.
    assert ("native: Check failed" in result.stderr) == (log_level == "0"), result.stderr


def test_output_is_printable_on_any_terminal():
    """A file name's bytes that are not UTF-8, and characters a terminal's
    encoding lacks, are escaped: printing them raised after the work was done."""
    import io

    from weights_convert.console import printable

    ascii_terminal = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    assert printable("caf\udce9 日本", ascii_terminal) == "caf\\xe9 \\u65e5\\u672c"
    assert printable("caf\udce9 日本") == "caf\\xe9 日本"
    assert printable("lone \ud800") == "lone \\ud800"
