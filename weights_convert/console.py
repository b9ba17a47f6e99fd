"""Helpers for the command-line entry points (importing no TensorFlow)."""

import argparse
import contextlib
import faulthandler
import os
import sys
import warnings


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, its usage errors one line like the commands' other errors.

    argparse prints the whole usage above the line that names the problem:
    16 lines for `keras-twins train`. Subcommands' parsers are of this class too.
    """

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def printable(text, stream=None):
    """`text` as `stream` (default: a UTF-8 one) writes it without an error:
    a file name's bytes that are not UTF-8 as \\xNN, other characters the
    stream's encoding lacks as \\uNNNN. A UTF-8 terminal's stdout refuses
    them (its errors are strict) and raised after the command's work was done.
    """
    try:  # a name's undecodable bytes are surrogates in Python's str
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        pass  # other lone surrogates: escaped below
    encoding = getattr(stream, "encoding", None) or "utf-8"
    return text.encode(encoding, "backslashreplace").decode(encoding)


@contextlib.contextmanager
def native_stderr_silenced():
    """File descriptor 2 goes to the null device meanwhile.

    Yields a duplicate of the real descriptor 2. `sys.stderr` is left as it
    is, so it writes to the null device too until the context ends.

    A fatal signal meanwhile (a native abort or crash) still shows: Python's
    faulthandler writes "Fatal Python error" and the Python stack to the real
    descriptor, where the process would otherwise end without a word.
    `TF_CPP_MIN_LOG_LEVEL=0` in the environment (all of TensorFlow's
    messages) leaves descriptor 2 as it is, which shows the native message too.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "0":
        os.dup2(devnull, 2)
    reporting_faults = not faulthandler.is_enabled()
    if reporting_faults:
        faulthandler.enable(saved, all_threads=False)
    try:
        yield saved
    finally:
        if reporting_faults:
            faulthandler.disable()
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def quiet_library_chatter():
    """Silences library warnings and native stderr output; `sys.stderr` still works.

    TensorFlow's C++ runtime writes start-up chatter (oneDNN, CUDA probing)
    straight to file descriptor 2, before any Python-side log setting
    applies, and torch and Keras warn about internals; either would bury a
    command's one-line error. Descriptor 2 goes to the null device and
    warnings are ignored meanwhile, while `sys.stderr` writes to the real
    stderr through a duplicate, so a progress bar still shows.
    """
    with native_stderr_silenced() as real_stderr:
        python_stderr = sys.stderr
        sys.stderr = os.fdopen(os.dup(real_stderr), "w", buffering=1)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            sys.stderr.close()
            sys.stderr = python_stderr
