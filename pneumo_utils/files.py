"""Writing files so that a failure never leaves half a file: atomic writes, JSON, digests.

Every write goes to a uniquely named temporary file in the target's own folder (so the final
rename stays on one file system and is atomic), then replaces the target in one step
(:func:`atomic_path`, which libraries that write to a path use directly). Several processes
writing the same file at once each leave a complete file; the last one wins.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_path",
    "file_digest",
    "json_depth",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp", mode: int | None = None) -> Iterator[Path]:
    """A temporary path that becomes ``path`` when the block ends without an exception.

    For writers that take a path (``model.save``, ``shutil.copyfile``,
    ``tf.io.TFRecordWriter``). The yielded path is a new, empty file
    ``.NAME.PID.RANDOM`` + ``suffix`` in ``path``'s folder, NAME being ``path``'s name less
    ``suffix`` (``model.keras`` with ``.keras`` gives ``.model.PID.k2j3x9aq.keras``): Keras
    reads the format from the suffix, and the process id tells a killed writer's temporary
    from a running one's. On a clean exit the file is flushed to disk, given ``mode``
    (default: ``0o666`` less the umask, as ``open`` would give; ``mkstemp`` alone leaves
    ``0o600``) and renamed over ``path``. On any exception, Ctrl-C included, the temporary
    is removed and ``path`` keeps what it had; an :class:`OSError` from the system that names
    no file (a full disk fails in ``write``) is given ``path``. ``path`` is a file, not a folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name.removesuffix(suffix) or path.name
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.{os.getpid()}.", suffix=suffix)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode if mode is not None else 0o666 & ~current_umask())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno is not None and exc.filename is None:  # without errno, str() would show "None"
            exc.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` through a unique temporary file and a rename
    (:func:`atomic_path`; ``mode`` as there). No temporary file survives a failed write."""
    path = Path(path)
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_bytes(data)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8, atomically (see :func:`write_bytes_atomic`)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically (see :func:`write_bytes_atomic`).

    NumPy scalars and arrays are written as plain numbers and lists; anything else that JSON
    cannot hold is written as its ``str``.
    """
    return write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default))


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def json_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in JSON ``text`` (brackets inside strings do not
    count), computed without parsing, so that a hostile file is refused before the parser
    recurses into it."""
    codes = np.frombuffer(_JSON_STRING.sub('""', text).encode(), dtype=np.uint8)
    steps = (np.isin(codes, (ord("["), ord("{"))).astype(np.int64)
             - np.isin(codes, (ord("]"), ord("}"))))
    return int(np.cumsum(steps).max(initial=0))


def file_digest(path: str | Path) -> str:
    """The SHA-256 of the file at ``path`` (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(functools.partial(handle.read, 2**20), b""):
            digest.update(block)
    return digest.hexdigest()
