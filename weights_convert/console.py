"""Helpers for the command-line entry points (importing no TensorFlow)."""

import contextlib
import os
import sys


@contextlib.contextmanager
def quiet_native_logs():
    """Silences file descriptor 2 (stderr) for the duration of the block.

    TensorFlow's C++ runtime writes start-up chatter (oneDNN, CUDA probing)
    to stderr before any Python-side log setting applies, which would bury a
    command's one-line error. The descriptor is restored on the way out, so
    errors printed after the block, tracebacks included, are seen.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
