"""weights="imagenet" against a loopback stand-in for the Hugging Face hub."""

import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import keras_twins
from conftest import max_error_within_tolerance
from keras_twins import pretrained
from keras_twins.pretrained import WeightsDownloadError

VARIANT = "twins_svt_small"
HUB_PATH = f"/timm/{VARIANT}.in1k/resolve/main/model.safetensors"


class Hub:
    """An HTTP server on 127.0.0.1 that serves one checkpoint, as the hub does.

    `mode` picks the behaviour: "ok" (a redirect, then the file), "truncated"
    (promises the whole file, sends half), "corrupt" (right length, wrong
    bytes) or "missing" (404). It shuts itself down after `lifetime` seconds.
    """

    def __init__(self, payload, lifetime=300):
        self.payload = payload
        self.mode = "ok"
        self.requests = 0
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hub.requests += 1
                if self.path == HUB_PATH and hub.mode != "missing":
                    self.send_response(302)
                    self.send_header("Location", "/blobs/model")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/blobs/model":
                    body = hub.payload
                    if hub.mode == "corrupt":
                        body = bytes(len(body))
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(hub.payload)))
                    self.end_headers()
                    self.wfile.write(body if hub.mode != "truncated" else body[: len(body) // 2])
                    self.close_connection = True
                else:
                    self.send_error(404, "Entry not found")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()
        self.timer = threading.Timer(lifetime, self.stop)
        self.timer.daemon = True
        self.timer.start()

    def stop(self):
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(random_reference, monkeypatch, tmp_path):
    reference, directory = random_reference(VARIANT)
    server = Hub((directory / "model.safetensors").read_bytes())
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    server.reference = reference
    yield server
    server.stop()


def cache_entries():
    models = pretrained.cache_dir()
    return sorted(os.listdir(models)) if os.path.isdir(models) else []


def test_imagenet_weights_match_timm_and_are_cached(hub):
    import torch

    model = keras_twins.TwinsSVTSmall(weights="imagenet", include_preprocessing=False,
                                      classifier_activation=None, input_shape=(97, 131, 3))
    images = np.random.default_rng(0).standard_normal((2, 3, 97, 131)).astype(np.float32)
    with torch.no_grad():
        expected = hub.reference(torch.from_numpy(images)).numpy()
    logits = model.predict(images.transpose(0, 2, 3, 1), verbose=0)
    ok, error, bound = max_error_within_tolerance(logits, expected)
    assert ok, f"max|diff| {error:.3g} > {bound:.3g}"

    assert cache_entries() == [f"{VARIANT}.in1k.sha256", f"{VARIANT}.in1k.weights.h5"]
    record = open(os.path.join(pretrained.cache_dir(), f"{VARIANT}.in1k.sha256")).read()
    assert record.split()[0] == hashlib.sha256(hub.payload).hexdigest()

    hub.stop()
    again = keras_twins.TwinsSVTSmall(weights="imagenet", include_preprocessing=False,
                                      classifier_activation=None, input_shape=(97, 131, 3))
    np.testing.assert_array_equal(again.predict(images.transpose(0, 2, 3, 1), verbose=0),
                                  logits)
    features = keras_twins.TwinsSVTSmall(weights="imagenet", include_top=False,
                                         input_shape=(None, None, 3))
    assert features.output.shape == (None, None, None, 512)
    np.testing.assert_array_equal(features.get_layer("norm").gamma.numpy(),
                                  model.get_layer("norm").gamma.numpy())
    # For grayscale images, the first convolution's RGB kernels summed, as
    # timm's `in_chans=1` (the parity tests compare the logits).
    gray = keras_twins.TwinsSVTSmall(weights="imagenet", input_shape=(None, None, 1))
    rgb_stem = model.get_layer("patch_embed_0").weights[0].numpy()
    np.testing.assert_allclose(gray.get_layer("patch_embed_0").weights[0].numpy(),
                               rgb_stem.sum(axis=2, keepdims=True), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(gray.get_layer("head").kernel.numpy(),
                                  model.get_layer("head").kernel.numpy())


def test_a_damaged_cache_entry_is_fetched_again(hub):
    """A cached file cut short failed every later call, until deleted by hand."""
    first = keras_twins.TwinsSVTSmall(weights="imagenet")
    requests = hub.requests
    path = pretrained.cached_weights_path(VARIANT)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)
    with pytest.warns(UserWarning, match="Fetching the ImageNet weights of twins_svt_small "
                                         "again"):
        again = keras_twins.TwinsSVTSmall(weights="imagenet")
    assert hub.requests == requests + 2  # the redirect and the file
    np.testing.assert_array_equal(again.get_layer("head").kernel.numpy(),
                                  first.get_layer("head").kernel.numpy())
    assert cache_entries() == [f"{VARIANT}.in1k.sha256", f"{VARIANT}.in1k.weights.h5"]


@pytest.mark.parametrize("mode, reason", [
    ("truncated", "truncated"),
    ("missing", "HTTP 404"),
    ("corrupt", "damaged"),
])
def test_bad_download_gives_a_clear_error_and_no_cache_entry(hub, mode, reason):
    hub.mode = mode
    with pytest.raises(WeightsDownloadError) as error:
        keras_twins.TwinsSVTSmall(weights="imagenet")
    message = str(error.value)
    assert reason in message
    assert hub.endpoint + HUB_PATH in message
    assert "HF_ENDPOINT" in message and 'weights="path/to/model.safetensors"' in message
    assert cache_entries() == []
    # A later call retries cleanly.
    hub.mode = "ok"
    keras_twins.TwinsSVTSmall(weights="imagenet", include_top=False)
    assert f"{VARIANT}.in1k.weights.h5" in cache_entries()


def test_refused_connection_fails_fast_with_a_clear_error(monkeypatch, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(WeightsDownloadError) as error:
        keras_twins.TwinsPCPVTSmall(weights="imagenet")
    assert time.monotonic() - start < 30
    message = str(error.value)
    url = f"http://127.0.0.1:{port}/timm/twins_pcpvt_small.in1k/resolve/main/model.safetensors"
    assert url in message
    assert "HF_ENDPOINT" in message and "weights=" in message
    assert cache_entries() == []


def test_an_endpoint_without_http_is_named_and_a_file_mirror_is_read(hub, monkeypatch,
                                                                     tmp_path):
    """HF_ENDPOINT=huggingface.co gave urllib's "unknown url type" ValueError."""
    monkeypatch.setenv("HF_ENDPOINT", "hf-mirror.example.com")
    with pytest.raises(WeightsDownloadError) as error:
        keras_twins.TwinsSVTSmall(weights="imagenet", include_top=False)
    assert str(error.value).startswith(
        f"Could not get the ImageNet weights of {VARIANT} from hf-mirror.example.com/timm/"), \
        error.value
    assert "HF_ENDPOINT must begin with https:// or http://" in str(error.value)
    assert cache_entries() == [] and hub.requests == 0
    # A copy of the hub's tree on disk serves as well.
    mirror = tmp_path / "mirror"
    entry = mirror / HUB_PATH.lstrip("/")
    entry.parent.mkdir(parents=True)
    entry.write_bytes(hub.payload)
    monkeypatch.setenv("HF_ENDPOINT", mirror.as_uri())
    model = keras_twins.TwinsSVTSmall(weights="imagenet", include_top=False)
    assert f"{VARIANT}.in1k.weights.h5" in cache_entries() and hub.requests == 0
    np.testing.assert_array_equal(model.get_layer("norm").gamma.numpy(),
                                  hub.reference.norm.weight.detach().numpy())


def test_pinned_digest_mismatch_is_refused(hub, monkeypatch):
    monkeypatch.setitem(pretrained.PINNED_SHA256, VARIANT, "0" * 64)
    with pytest.raises(WeightsDownloadError, match="differs from the pinned"):
        keras_twins.TwinsSVTSmall(weights="imagenet")
    assert cache_entries() == []


def test_two_processes_loading_at_once_share_one_whole_entry(hub):
    script = (
        "import numpy as np, keras_twins\n"
        "m = keras_twins.TwinsSVTSmall(weights='imagenet', input_shape=(64, 64, 3))\n"
        "print(float(m.predict(np.full((1, 64, 64, 3), 128.0, 'float32'), verbose=0).max()))\n"
    )
    processes = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr
    assert outputs[0][0].split()[-1] == outputs[1][0].split()[-1]
    assert cache_entries() == [f"{VARIANT}.in1k.sha256", f"{VARIANT}.in1k.weights.h5"]
    assert hub.requests == 2  # one redirect and one file: the second process waited
