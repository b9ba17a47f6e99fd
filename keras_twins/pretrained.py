"""ImageNet weights: download timm's checkpoint, check it, convert it, cache it.

The source is timm's published `model.safetensors` of each variant on the
Hugging Face hub (or the mirror `HF_ENDPOINT` names). It is converted
without torch and cached as a Keras `.weights.h5` under
`$KERAS_HOME/models`, so only the first call needs the network. Nothing
enters the cache before it has been fully downloaded, parsed, matched
against the variant's complete key/shape set and converted; entries appear by
an atomic rename, under a lock, so concurrent processes never see half a file.
"""

import contextlib
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request

import keras

from keras_twins.files import replacing
from keras_twins.files import write_text

DEFAULT_HF_ENDPOINT = "https://huggingface.co"
# Seconds a connection attempt or a stalled read may take before giving up.
NETWORK_TIMEOUT = 15
# sha256 of timm's published files, pinned where verified. None are pinned
# yet (this package was built where the hub cannot be reached); the digest of
# every download is recorded beside its cache entry either way.
PINNED_SHA256 = {}


class WeightsDownloadError(OSError):
    """The pretrained weights could not be fetched or were damaged."""


def weights_url(variant):
    endpoint = os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT
    return f"{endpoint.rstrip('/')}/timm/{variant}.in1k/resolve/main/model.safetensors"


def cache_dir():
    """`$KERAS_HOME/models` (default `~/.keras/models`), as Keras' `get_file` uses."""
    base = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    if os.path.isdir(base) and not os.access(base, os.W_OK):
        base = os.path.join(tempfile.gettempdir(), ".keras")  # Keras' own fallback
    return os.path.join(base, "models")


def cached_weights_path(variant):
    return os.path.join(cache_dir(), f"{variant}.in1k.weights.h5")


def _digest_path(variant):
    """Where the sha256 of the download that made the cache entry is recorded."""
    return os.path.join(cache_dir(), f"{variant}.in1k.sha256")


def imagenet_weights(variant):
    """Returns the path of the cached Keras weights of `variant`, fetching them once.

    Raises:
        WeightsDownloadError: the download failed or was damaged; the message
            names the URL, `HF_ENDPOINT` and how to pass a local checkpoint.
    """
    target = cached_weights_path(variant)
    if os.path.exists(target):
        return target
    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
    with _locked(directory):
        if os.path.exists(target):  # another process finished it meanwhile
            return target
        url = weights_url(variant)
        with _temporary(directory, ".safetensors") as download:
            digest = _download(url, download, variant)
            pinned = PINNED_SHA256.get(variant)
            if pinned and digest != pinned:
                raise _error(variant, url, f"sha256 {digest} differs from the pinned {pinned}")
            with replacing(target) as converted:
                _convert(variant, url, download, converted)
                write_text(_digest_path(variant), f"{digest}  {url}\n")
    return target


def discard_cached_weights(variant):
    """Deletes the cache entry of `variant` (a damaged one), if there is one."""
    target = cached_weights_path(variant)
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        return
    with _locked(directory):
        for path in (target, _digest_path(variant)):
            if os.path.exists(path):
                os.remove(path)


def _download(url, destination, variant):
    """Streams `url` into `destination` with a progress bar; returns its sha256."""
    digest = hashlib.sha256()
    if urllib.parse.urlsplit(url).scheme not in ("http", "https", "file"):
        # urllib's "unknown url type" ValueError named neither HF_ENDPOINT nor a way out.
        raise _error(variant, url, "HF_ENDPOINT must begin with https:// or http://")
    request = urllib.request.Request(url, headers={"User-Agent": "keras-twins"})
    try:
        with urllib.request.urlopen(request, timeout=NETWORK_TIMEOUT) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            print(f"Downloading {url}")
            progress = keras.utils.Progbar(expected, unit_name="byte")
            received = 0
            with open(destination, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    progress.update(received)
    except urllib.error.HTTPError as error:
        raise _error(variant, url, f"HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise _error(variant, url, str(error.reason)) from None
    except (OSError, http.client.HTTPException) as error:
        reason = f"the download broke off ({type(error).__name__}: {error})"
        raise _error(variant, url, reason) from None
    if expected is not None and received != expected:
        raise _error(variant, url, f"truncated download: {received} of {expected} bytes")
    return digest.hexdigest()


def _convert(variant, url, source, destination):
    """Checks the download holds the variant's full key/shape set; writes Keras weights."""
    from keras_twins.model import Twins
    from keras_twins.variants import get_variant
    from weights_convert import ConversionError
    from weights_convert import assign_state_dict
    from weights_convert import read_checkpoint

    model = Twins(**get_variant(variant)["config"], classes=1000,
                  input_shape=(None, None, 3), name=variant)
    try:
        assign_state_dict(model, read_checkpoint(source), url)
    except ConversionError as error:
        raise _error(variant, url, f"the downloaded file is damaged ({error})") from None
    model.save_weights(destination, overwrite=True)


def _error(variant, url, reason):
    return WeightsDownloadError(
        f"Could not get the ImageNet weights of {variant} from {url}: {reason}. "
        "Set HF_ENDPOINT to a reachable mirror of the Hugging Face hub, or pass "
        f'a local checkpoint: weights="path/to/model.safetensors" (timm\'s '
        f"{variant}.in1k file, or an official Twins .pth) or a converted "
        "weights=\"path/to/model.weights.h5\"."
    )


@contextlib.contextmanager
def _temporary(directory, suffix):
    """A temporary file name in `directory`, removed on the way out unless renamed."""
    handle, path = tempfile.mkstemp(prefix=".partial-", suffix=suffix, dir=directory)
    os.close(handle)
    try:
        yield path
    finally:
        if os.path.exists(path):
            os.remove(path)


@contextlib.contextmanager
def _locked(directory):
    """Holds an exclusive lock on the cache directory itself (no lock file left over)."""
    try:
        import fcntl
    except ImportError:  # Windows: atomic renames alone keep entries whole.
        yield
        return
    handle = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        os.close(handle)
