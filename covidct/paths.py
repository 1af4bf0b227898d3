"""Where covidct reads and writes: the cache folder, and output paths checked before any work.

    cache_root()                 $COVIDCT_CACHE or ~/.cache/covidct
    image_cache_dir(cache_dir)   the decoded-image cache: cache_dir, or cache_root()/images
    writable_dir(path, option)   create the folder and prove a file can be written there
    writable_file(path, option)  the same for the folder a file will be written to

A run that can only fail at the end (an evaluation next to a read-only
checkpoint, a --gradcam folder under a file) fails at the start instead, with
one line naming the option and the path.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import CovidCTError


def cache_root() -> Path:
    """Where generated data and decoded-image caches live ($COVIDCT_CACHE or ~/.cache/covidct)."""
    return Path(os.environ.get("COVIDCT_CACHE", Path.home() / ".cache" / "covidct"))


def image_cache_dir(cache_dir=None) -> str:
    """The one default for every command's --cache-dir: cache_root()/images."""
    return str(cache_dir) if cache_dir else str(cache_root() / "images")


def writable_dir(path, option: str, shown=None) -> Path:
    """Create ``path`` (and its parents) and write/remove a probe file in it; CovidCTError if either fails.

    shown: the path the message names (default: ``path``).
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=path, prefix=".covidct-write-test-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or str(error)
        if isinstance(error, (FileExistsError, NotADirectoryError)):
            reason = f"{reason}: a file stands where a folder is needed"
        raise CovidCTError(f"{option} {shown or path}: cannot write there ({reason})") from None
    return path


def writable_file(path, option: str) -> Path:
    """Check that ``path`` can be written: its folder is writable and the path is not a folder."""
    path = Path(path)
    if path.is_dir():
        raise CovidCTError(f"{option} {path}: is a directory, expected a file name")
    writable_dir(path.parent, option, shown=path)
    if path.exists() and not os.access(path, os.W_OK):
        raise CovidCTError(f"{option} {path}: the file exists and is read-only")
    return path
