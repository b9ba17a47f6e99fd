"""The converter refuses every damaged checkpoint cleanly and never leaves a file."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
import torch
from PIL import Image

import keras
import keras_twins
from conftest import TINY
from conftest import max_error_within_tolerance
from conftest import run_cli as run_keras_twins
from weights_convert import ConversionError
from weights_convert import read_checkpoint

VARIANT = "twins_svt_small"


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "weights_convert", *map(str, args)],
        capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def state_dict(random_reference):
    _, directory = random_reference(VARIANT)
    return read_checkpoint(directory / "model.safetensors")


class Evil:
    """Unpickling this creates a directory: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _damaged(kind, state_dict, random_reference, directory):
    """Writes a damaged checkpoint; returns its path and a word the error must name."""
    _, source = random_reference(VARIANT)
    if kind == "missing_key":
        damaged = dict(state_dict)
        del damaged["blocks.2.3.attn.kv.weight"]
        path = directory / "missing.safetensors"
        safetensors.numpy.save_file(damaged, str(path))
        return path, "blocks.2.3.attn.kv.weight"
    if kind == "half_a_head":  # converted as a model without a head before
        damaged = dict(state_dict)
        del damaged["head.weight"]
        path = directory / "half_a_head.safetensors"
        safetensors.numpy.save_file(damaged, str(path))
        return path, "missing key 'head.weight'"
    if kind == "unexpected_key":
        damaged = {**state_dict, "blocks.2.3.attn.extra.weight": np.zeros(3, np.float32)}
        path = directory / "unexpected.safetensors"
        safetensors.numpy.save_file(damaged, str(path))
        return path, "blocks.2.3.attn.extra.weight"
    if kind == "shape_mismatch":
        damaged = {**state_dict, "blocks.2.3.attn.proj.weight": np.zeros((256, 255), np.float32)}
        path = directory / "shape.pth"
        torch.save({k: torch.from_numpy(v) for k, v in damaged.items()}, path)
        return path, "[256, 255]"
    if kind == "not_finite":
        weight = state_dict["blocks.1.0.mlp.fc2.weight"].copy()
        weight[0, :2] = [np.nan, np.inf]
        path = directory / "diverged.safetensors"
        safetensors.numpy.save_file({**state_dict, "blocks.1.0.mlp.fc2.weight": weight},
                                    str(path))
        return path, "'blocks.1.0.mlp.fc2.weight' holds 2 non-finite values"
    if kind in ("truncated_safetensors", "truncated_pth"):
        suffix = "safetensors" if kind == "truncated_safetensors" else "pth"
        data = (source / f"model.{suffix}").read_bytes()
        path = directory / f"truncated.{suffix}"
        path.write_bytes(data[: len(data) // 2])
        return path, "truncated"
    if kind == "not_a_checkpoint_pth":  # torch read it as a pickle: "KeyError: 't'"
        path = directory / "notes.pth"
        path.write_text("these are not weights\n")
        return path, "notes.pth: not a PyTorch checkpoint: it begins with b'these are not"
    if kind == "web_page_pth":  # torch: "Weights only load failed", as for a pickle of code
        path = directory / "download.pth"
        path.write_text("<!DOCTYPE html><html>...")
        return path, "it begins with b'<!DOCTYPE html>"
    if kind == "empty_pth":
        path = directory / "empty.bin"
        path.write_bytes(b"")
        return path, "empty.bin: an empty file"
    if kind == "folder":
        path = directory / "model.pth"
        path.mkdir()
        return path, "model.pth: a folder, not a checkpoint file"
    if kind == "not_a_checkpoint_safetensors":
        path = directory / "notes.safetensors"
        path.write_bytes(os.urandom(4096))
        return path, "notes.safetensors"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", [
    "missing_key", "half_a_head", "unexpected_key", "shape_mismatch", "not_finite",
    "truncated_safetensors",
    "truncated_pth", "not_a_checkpoint_pth", "web_page_pth", "empty_pth", "folder",
    "not_a_checkpoint_safetensors",
])
def test_damaged_checkpoint_is_refused_with_one_line_and_no_output(
        kind, state_dict, random_reference, tmp_path):
    path, named = _damaged(kind, state_dict, random_reference, tmp_path)
    output = tmp_path / "out.weights.h5"
    result = run_cli(path, "--output", output)
    assert result.returncode != 0
    message = result.stderr.strip()
    assert "Traceback" not in message
    assert len(message.splitlines()) == 1, message
    assert named in message, message
    assert not output.exists()
    assert [p.name for p in tmp_path.iterdir() if "weights.h5" in p.name] == []


def test_a_safetensors_file_under_a_pickle_suffix_is_read_as_safetensors(
        state_dict, random_reference, tmp_path):
    _, source = random_reference(VARIANT)
    renamed = tmp_path / "pytorch_model.bin"
    renamed.write_bytes((source / "model.safetensors").read_bytes())
    read = read_checkpoint(renamed)
    assert read.keys() == state_dict.keys()
    assert all(np.array_equal(read[key], state_dict[key]) for key in read)


@pytest.mark.parametrize("name", ["model.safetensors", "model.pth"])
def test_an_unreadable_checkpoint_is_named(name, random_reference, tmp_path, monkeypatch):
    _, source = random_reference(VARIANT)
    path = tmp_path / name
    path.write_bytes((source / name).read_bytes())
    opened = open

    def denied(file, *args, **kwargs):  # chmod 000 does not stop root, who may run this
        if os.fspath(file) == os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return opened(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(ConversionError, match=f"{name}: cannot be read \\(Permission denied\\)$"):
        read_checkpoint(path)


def test_failed_conversion_leaves_an_existing_output_untouched(
        state_dict, random_reference, tmp_path):
    path, _ = _damaged("shape_mismatch", state_dict, random_reference, tmp_path)
    output = tmp_path / "kept.weights.h5"
    output.write_bytes(b"previous good file")
    assert run_cli(path, "--output", output).returncode != 0
    assert output.read_bytes() == b"previous good file"


@pytest.mark.parametrize("format", ["zip", "legacy_pickle"])
def test_code_carrying_pickle_does_not_run(format, tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    payload = {"patch_embeds.0.proj.weight": Evil(str(marker))}
    if format == "zip":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    output = tmp_path / "out.weights.h5"
    result = run_cli(path, "--output", output)
    assert result.returncode != 0
    assert "refused" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists(), "unpickling ran code"
    assert not output.exists()


def test_a_whole_pickled_module_is_refused_with_the_way_out(tmp_path):
    """torch.save(model) is a common slip: refused, without saying what to save."""
    path = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    result = run_cli(path, "--output", tmp_path / "out.weights.h5")
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "save model.state_dict() instead" in result.stderr


def test_wrapped_checkpoint_with_fine_tuned_head_converts_and_detects_variant(
        state_dict, tmp_path):
    head = {"head.weight": np.ones((10, 512), np.float32), "head.bias": np.zeros(10, np.float32)}
    wrapped = {"model": {k: torch.from_numpy(v) for k, v in {**state_dict, **head}.items()},
               "epoch": 3}
    path = tmp_path / "finetuned.pth"
    torch.save(wrapped, path)
    output = tmp_path / "finetuned.weights.h5"
    result = run_cli(path, "--output", output)
    assert result.returncode == 0, result.stderr
    assert VARIANT in result.stdout and "10 classes" in result.stdout

    model = keras_twins.TwinsSVTSmall(weights=str(output), classes=10)
    np.testing.assert_array_equal(model.get_layer("head").kernel.numpy(), head["head.weight"].T)
    # The checkpoint itself loads on the fly too, and names the class count.
    with pytest.raises(ValueError, match="classes=10"):
        keras_twins.TwinsSVTSmall(weights=str(path), classes=1000)
    features = keras_twins.TwinsSVTSmall(weights=str(path), include_top=False)
    assert features.output.shape[-1] == 512


def test_a_checkpoint_of_one_channel_images_converts_and_loads_where_it_fits(
        state_dict, tmp_path, capfd):
    """A model trained on grayscale images (timm's `in_chans=1`) keeps its
    channel: it was refused as a shape mismatch of its first convolution."""
    gray = dict(state_dict)
    gray["patch_embeds.0.proj.weight"] = state_dict["patch_embeds.0.proj.weight"].sum(
        axis=1, keepdims=True)
    path = tmp_path / "gray.safetensors"
    safetensors.numpy.save_file(gray, str(path))
    output = tmp_path / "gray.weights.h5"
    result = run_cli(path, "--output", output)
    assert result.returncode == 0, result.stderr
    assert "1-channel images (load with input_shape=(H, W, 1))" in result.stdout
    expected = gray["patch_embeds.0.proj.weight"].transpose(2, 3, 1, 0)
    for weights in (output, path):
        model = keras_twins.TwinsSVTSmall(weights=str(weights), input_shape=(None, None, 1))
        np.testing.assert_array_equal(model.get_layer("patch_embed_0").weights[0], expected)
    with pytest.raises(ValueError) as error:
        keras_twins.TwinsSVTSmall(weights=str(path))
    assert str(error.value) == (
        f"{path}: its first convolution takes 1-channel images and {VARIANT} takes 3; only "
        "RGB (3-channel) weights are adapted to another count: build the model with "
        "input_shape=(H, W, 1)")
    # The command classifies image files with it, as gray.
    image = tmp_path / "photo.png"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(image)
    code, out, err = run_keras_twins(capfd, "predict", "--model", VARIANT, "--weights", path,
                                     "--json", "--top", "1", image)
    assert code == 0, err
    best = json.loads(out)[0]["predictions"][0]
    model = keras_twins.TwinsSVTSmall(weights=str(path), input_shape=(224, 224, 1))
    expected = model.predict(np.full((1, 224, 224, 1), 128, np.float32), verbose=0)[0]
    assert best["class_id"] == expected.argmax()
    assert abs(best["probability"] - expected.max()) < 1e-5


class _NotPlainData:
    pass


def test_training_script_checkpoints_are_read(state_dict, tmp_path):
    """timm's train.py and the official repository's main.py save their weights
    beside an optimizer state and the run's argparse.Namespace."""
    import argparse

    tensors = {k: torch.from_numpy(v) for k, v in state_dict.items()}
    ema = {k: v + 1 for k, v in tensors.items()}
    args = argparse.Namespace(model=VARIANT, lr=5e-4, epochs=300, sched="cosine")
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}
    layouts = {
        "model_best.pth.tar": ({"epoch": 3, "arch": VARIANT, "state_dict": tensors,
                                "optimizer": optimizer, "version": 2, "args": args,
                                "state_dict_ema": ema, "metric": 81.2}, 0),
        "checkpoint.pth": ({"model": tensors, "optimizer": optimizer, "epoch": 3,
                            "lr_scheduler": {"last_epoch": 3}, "args": args,
                            "model_ema": ema}, 0),
        "ema_only.pth": ({"state_dict_ema": ema, "epoch": 3}, 1),
    }
    for name, (checkpoint, offset) in layouts.items():
        torch.save(checkpoint, tmp_path / name)
        read = read_checkpoint(tmp_path / name)
        assert read.keys() == state_dict.keys(), name
        for key, value in state_dict.items():
            np.testing.assert_array_equal(read[key], value + offset, err_msg=name)
    # Only the Namespace is allowed: other objects beside the weights are still refused.
    torch.save({"state_dict": tensors, "args": _NotPlainData()}, tmp_path / "other.pth")
    with pytest.raises(ConversionError, match="refused"):
        read_checkpoint(tmp_path / "other.pth")


def test_variant_flag_for_another_variant_is_refused(random_reference, tmp_path):
    _, directory = random_reference(VARIANT)
    output = tmp_path / "x.weights.h5"
    result = run_cli(directory / "model.safetensors", "--output", output,
                     "--variant", "twins_pcpvt_small")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "key" in result.stderr and not output.exists()


def test_unknown_variant_name_and_bad_output_suffix(random_reference, tmp_path):
    _, directory = random_reference(VARIANT)
    result = run_cli(directory / "model.safetensors", "--output", tmp_path / "x.weights.h5",
                     "--variant", "twins_svt_tiny")
    assert result.returncode != 0 and "twins_svt_tiny" in result.stderr
    result = run_cli(directory / "model.safetensors", "--output", tmp_path / "x.h5")
    assert result.returncode != 0 and ".weights.h5" in result.stderr
    assert "Traceback" not in result.stderr


def test_unrecognized_architecture_asks_for_variant(state_dict):
    from weights_convert import detect_variant

    damaged = {k: v for k, v in state_dict.items() if not k.startswith("blocks.2.9.")}
    with pytest.raises(ConversionError, match="--variant"):
        detect_variant(damaged)


@pytest.mark.parametrize("key", [
    "blocks.0.0.attn.qkv.weight", "patch_embeds.1.proj.weight", "blocks.1.1.norm1.weight",
    "blocks.3.0.mlp.fc1.weight",
])
def test_a_missing_key_the_variant_is_read_from_is_named(key, state_dict):
    """Detection read each of these keys alone: without it, "no Twins variant has these shapes"."""
    from weights_convert import build_model_for
    from weights_convert import detect_variant

    damaged = {k: v for k, v in state_dict.items() if k != key}
    assert detect_variant(damaged) == VARIANT
    if key == "blocks.0.0.attn.qkv.weight":
        with pytest.raises(ConversionError, match=f"missing key '{key}' for {VARIANT}"):
            build_model_for(damaged)


def test_a_state_dict_of_another_network_is_named_as_such():
    from weights_convert import detect_variant

    with pytest.raises(ConversionError, match="not a Twins checkpoint: none of its 2 keys"):
        detect_variant({"conv.weight": np.zeros((8, 3, 3, 3)), "fc.weight": np.zeros((2, 8))})


def test_bfloat16_and_float16_safetensors_are_read(tmp_path):
    values = torch.randn(4, 3)
    path = tmp_path / "half.safetensors"
    import safetensors.torch

    safetensors.torch.save_file(
        {"a": values.to(torch.bfloat16), "b": values.to(torch.float16)}, str(path)
    )
    loaded = read_checkpoint(path)
    np.testing.assert_array_equal(loaded["a"], values.to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(loaded["b"], values.to(torch.float16).float().numpy())


def test_safetensors_conversion_never_imports_torch(random_reference, tmp_path):
    _, directory = random_reference(VARIANT)
    output = tmp_path / "no_torch.weights.h5"
    script = (
        "import sys\n"
        "class NoTorch:\n"  # behaves as if torch were not installed
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from weights_convert.__main__ import main\n"
        f"code = main([{str(directory / 'model.safetensors')!r}, '--output', {str(output)!r}])\n"
        "assert 'torch' not in sys.modules\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert output.exists()


def test_written_files_get_the_permissions_of_any_new_file(random_reference, tmp_path):
    """Files written under a temporary name and renamed came from mkstemp,
    readable by their owner only (0600): converted weights, model.keras,
    labels.txt and run.json could not be served or shared."""
    from keras_twins.files import write_text
    from keras_twins.training import save_model
    from weights_convert import convert

    _, directory = random_reference(VARIANT)
    previous = os.umask(0o027)
    try:
        convert(directory / "model.safetensors", tmp_path / "svt.weights.h5")
        save_model(keras_twins.Twins(**TINY, input_shape=(32, 32, 3), classes=2),
                   tmp_path / "model.keras")
        write_text(tmp_path / "labels.txt", "a\nb\n")
    finally:
        os.umask(previous)
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in tmp_path.iterdir()}
    assert modes == {name: oct(0o640) for name in ("svt.weights.h5", "model.keras",
                                                   "labels.txt")}


def _official_dense_prediction_pyramid(model, norms, images):
    """The stage maps of the official SVT detection / segmentation backbone
    (`segmentation/gvt.py`, `extra_norm=True`), from timm's modules: each
    stage's tokens go through `norm_list[i]`, and the normed map feeds the
    next stage."""
    x, maps = images, []
    for embed, drop, blocks, peg, norm in zip(model.patch_embeds, model.pos_drops, model.blocks,
                                              model.pos_block, norms):
        x, size = embed(x)
        x = drop(x)
        for j, block in enumerate(blocks):
            x = block(x, size)
            if j == 0:
                x = peg(x, size)
        x = norm(x).reshape(x.shape[0], *size, -1)
        maps.append(x.numpy())
        x = x.permute(0, 3, 1, 2).contiguous()
    return maps


def test_a_segmentation_checkpoint_gives_its_backbone_with_its_pyramid_norms(
        random_reference, tmp_path):
    reference, directory = random_reference(VARIANT)
    # An ImageNet checkpoint has no pyramid norms: they keep their identity start.
    started = keras_twins.TwinsSVTSmall(include_top=False, pyramid_norm=True,
                                        weights=str(directory / "model.safetensors"))
    np.testing.assert_array_equal(started.get_layer("pyramid_norm_2").gamma.numpy(), 1.0)
    np.testing.assert_array_equal(started.get_layer("norm").gamma.numpy(),
                                  reference.norm.weight.detach().numpy())
    torch.manual_seed(5)
    norms = torch.nn.ModuleList(torch.nn.LayerNorm(dim, eps=1e-6) for dim in (64, 128, 256, 512))
    with torch.no_grad():
        for parameter in norms.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.5 + 1.0)
    # As mmsegmentation saves it: the backbone (with the unused head it keeps), the
    # neck and the decode head, under "state_dict" beside the run's metadata.
    weights = {f"backbone.{k}": v for k, v in reference.state_dict().items()}
    weights.update({f"backbone.norm_list.{k}": v for k, v in norms.state_dict().items()})
    weights["neck.lateral_convs.0.conv.weight"] = torch.zeros(256, 64, 1, 1)
    weights["decode_head.conv_seg.weight"] = torch.zeros(150, 128, 1, 1)
    path = tmp_path / "upernet_svt_small.pth"
    torch.save({"meta": {"CLASSES": ("wall", "floor"), "iter": 160000},
                "state_dict": weights, "optimizer": {"state": {}}}, path)

    images = np.random.default_rng(6).uniform(0, 255, (1, 96, 128, 3)).astype("float32")
    normalized = (images / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    with torch.no_grad():
        expected = _official_dense_prediction_pyramid(
            reference, norms, torch.from_numpy(normalized.transpose(0, 3, 1, 2)).float())
    output = tmp_path / "backbone.weights.h5"
    result = run_cli(path, "--output", output)
    assert result.returncode == 0, result.stderr
    assert "no head, pyramid norms (load with pyramid_norm=True)" in result.stdout
    for weights_file in (path, output):
        backbone = keras_twins.TwinsSVTSmall(include_top=False, pyramid_norm=True,
                                             weights=str(weights_file),
                                             input_shape=(None, None, 3))
        pyramid = keras.Model(backbone.inputs, backbone.pyramid_outputs).predict(
            images, verbose=0)
        for level, reference_map in zip(("P2", "P3", "P4", "P5"), expected):
            within, error, bound = max_error_within_tolerance(pyramid[level], reference_map)
            assert within, (weights_file.name, level, error, bound)
        # Without the norms the model is another network: refused, not loaded in part.
        with pytest.raises((ValueError, ConversionError), match="pyramid_norm=True"):
            keras_twins.TwinsSVTSmall(include_top=False, weights=str(weights_file))
