"""Files written whole: a reader never sees half of one, and a failed write keeps the old one."""

import contextlib
import os
import shutil
import tempfile

from weights_convert.console import printable

# The prefix of `replacing`'s staging folder, left behind only by a killed process.
STAGING_PREFIX = ".partial-"


@contextlib.contextmanager
def replacing(path):
    """Yields a temporary path beside `path`, moved onto `path` if the block succeeds.

    The block creates the file (or folder) at the temporary path itself, in a
    fresh folder beside `path`, so that it gets the permissions of any new
    file (the umask's); a file from `tempfile.mkstemp` is readable by its
    owner only, and `model.keras`, `labels.txt` and converted weights were.
    A folder at `path` (a SavedModel being replaced) is moved aside first and
    deleted only once the new one is in place.
    """
    directory = os.path.dirname(os.path.abspath(path))
    staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory)
    target = os.path.join(staging, os.path.basename(os.path.normpath(path)) or "written")
    try:
        yield target
        previous = None
        if os.path.isdir(path) and not os.path.islink(path):
            previous = os.path.join(staging, "previous")
            os.replace(path, previous)
        try:
            os.replace(target, path)
        except BaseException:
            if previous:
                os.replace(previous, path)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_text(path, text):
    """Writes `text` (UTF-8) to `path` whole."""
    with replacing(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)


def non_utf8_problem(path):
    """Why TensorFlow cannot write to `path`, or None: its file functions (the
    SavedModel writer, summaries, checkpoints) take UTF-8 paths only."""
    path = os.fsdecode(path)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return (f"{printable(path)}: TensorFlow writes only to UTF-8 paths, and this one "
                "is not UTF-8: choose another name")
    return None


def other_entries(folder, names=(), prefixes=()):
    """The sorted entries of `folder` that are none of `names` and start with
    none of `prefixes`: what deleting or filling the folder would lose."""
    return sorted(name for name in os.listdir(folder)
                  if name not in names and not name.startswith(tuple(prefixes)))
