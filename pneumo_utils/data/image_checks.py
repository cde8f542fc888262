"""Which files TensorFlow may decode, and the damage checks of whole data sets with their
cached verdicts.

* :func:`graph_decode`: plain files can be decoded by TensorFlow instead of
  :func:`~pneumo_utils.data.images.read_resized`: 8-bit gray or RGB JPEG and PNG files,
  upright and undamaged, of at most :data:`GRAPH_PIXELS` decoded pixels, whose pixels
  TensorFlow's decoders reproduce given the reduced-scale settings ``read_resized`` would use.
* :func:`check_image` decodes one file for real; :func:`check_images` does it for many, in
  threads, with verdicts cached in SQLite by the file's content (a BLAKE2b digest of its
  bytes), so a file edited in place is checked again whatever its size and modification time;
  :func:`checked_readable` reads the cache without decoding.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pneumo_utils.data.dicom import is_dicom
from pneumo_utils.data.images import (
    MIN_SIDE,
    PIXEL_BUDGET,
    ImageReadError,
    exif_orientation,
    file_size,
    open_pil,
    png_chunks,
    read_header,
    read_resized,
    verify_jpeg,
    verify_png,
)

__all__ = [
    "CHECK_CACHE_ENV",
    "GRAPH_PIXELS",
    "GraphDecode",
    "check_image",
    "check_images",
    "checked_readable",
    "graph_decode",
]

CHECK_CACHE_ENV = "PNEUMO_CHECK_CACHE"
"""Environment variable naming the cache file of :func:`check_images` (empty: no cache)."""

GRAPH_PIXELS = 2_048 * 2_048
"""Most pixels TensorFlow decodes for one file (after a JPEG's reduced-scale decode): larger
files go through :func:`~pneumo_utils.data.images.read_resized`. TensorFlow decodes a PNG
whole and holds it once more as int32 while block averaging, for several files at once, so a
folder of 36 Mpx PNGs (a few hundred KB each) would need gigabytes; Pillow's decode holds 4
bytes per pixel of one file per thread. Chest radiographs at 224-512 px are decoded from JPEGs
at 1/2 to 1/8 scale, and NIH's PNGs are 1 Mpx, so they stay on the fast path."""

_CHECK_VERSION = "4"  # part of the cache key: a change to what check_image tests invalidates it
_DIGEST_BYTES = 20
_PNG_ORIENTATION_KEYS = (b"Raw profile type exif", b"XML:com.adobe.xmp")  # text keys Pillow reads


@dataclass(frozen=True)
class GraphDecode:
    """How TensorFlow's own decoders give the pixels of :func:`read_resized` for one file
    (see :func:`graph_decode`): ``format`` (``JPEG`` or ``PNG``), stored ``channels`` (1 gray,
    3 RGB), libjpeg's ``jpeg_ratio`` (the JPEG is decoded at 1/1, 1/2, 1/4 or 1/8 scale; 1
    for a PNG) and the ``box`` factor of the block averaging that follows (1: none)."""

    format: str
    channels: int
    jpeg_ratio: int
    box: int


def graph_decode(path: str | os.PathLike, size: int, verified: bool = False) -> GraphDecode | None:
    """How to decode ``path`` with TensorFlow so that the pixels equal ``read_resized(path,
    size)``, or ``None`` when only :func:`read_resized` reads it as intended.

    TensorFlow's decoders cover 8-bit gray or RGB JPEG and PNG files: upright (EXIF
    orientation 1), no palette, alpha, transparency, CMYK or animation, at most
    :data:`GRAPH_PIXELS` pixels to decode (larger files are left to :func:`read_resized`, whose
    decode needs less memory). The file must also pass the damage checks that
    :func:`read_resized` makes before decoding (a strict libjpeg pass at 1/8 scale, PNG chunk
    types and checksums): TensorFlow decodes a JPEG with corrupt data to a wrong picture without an
    error, so a damaged file gets ``None`` and is left to :func:`read_resized`, whose
    :class:`ImageReadError` names it. ``verified=True`` skips that check for a file that
    already passed :func:`check_image` as it is now (see :func:`checked_readable`). Costs a
    header read and the check, no full decode; never raises for an unreadable file.
    """
    path = Path(path)
    target = 2 * int(size)  # read_resized decodes at no less than twice the output size
    try:
        size_bytes = file_size(path)
        if is_dicom(path):
            return None
        with open_pil(path) as im:
            width, height = im.size
            if im.mode not in ("L", "RGB") or width * height > PIXEL_BUDGET:
                return None
            if im.format == "JPEG" and len(im.tile) == 1 and exif_orientation(im) == 1:
                scale = min(width // target, height // target)
                ratio = max(s for s in (1, 2, 4, 8) if s <= max(scale, 1))  # as Image.draft
                width, height = -(-width // ratio), -(-height // ratio)
            elif im.format == "PNG" and _plain_png(path):
                ratio = 1
            else:
                return None
            if width * height > GRAPH_PIXELS:
                return None
            if verified:
                pass
            elif im.format == "JPEG":
                verify_jpeg(path)
            else:
                verify_png(path, size_bytes)
            box = max(1, min(width // target, height // target))  # as _reduce
            return GraphDecode(im.format, 1 if im.mode == "L" else 3, ratio, box)
    except Exception:
        return None


def check_image(path: str | os.PathLike) -> str | None:
    """Return ``None`` if ``path`` decodes cleanly, else a one-line description of the problem.

    The file is decoded for real, at reduced scale where the format allows (the same code
    path as :func:`read_resized`), so whatever this accepts a training or evaluation
    pipeline can read. Images smaller than :data:`MIN_SIDE` are refused too. The
    description does not repeat the path. For many files use :func:`check_images`, which
    caches the verdicts and runs in parallel.
    """
    path = Path(path)
    try:
        read_resized(path, MIN_SIDE)  # decoded at reduced scale, at least 64 x 64
        header = read_header(path)
    except FileNotFoundError:
        return "file not found"
    except ImageReadError as exc:
        return exc.reason
    except MemoryError:
        raise
    except Exception as exc:
        return f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    if min(header.width, header.height) < MIN_SIDE:
        return (f"image too small ({header.width} x {header.height} px; at least "
                f"{MIN_SIDE} px on each side is needed)")
    return None


def check_images(
    paths: Sequence[str | os.PathLike],
    cache: str | os.PathLike | None = "default",
    workers: int | None = None,
) -> list[str | None]:
    """:func:`check_image` for many files: verdicts in order (``None`` = readable).

    Verdicts are cached by content (a BLAKE2b digest of the file's bytes, with the version of
    the check) in an SQLite file, so a data set is decoded once, not on every load, and a file
    changed in place is checked again even when its size and modification time are kept:
    ``cache="default"`` uses the file named by the ``PNEUMO_CHECK_CACHE`` environment
    variable, else ``~/.cache/pneumo/image-checks.sqlite``; ``None`` (or an empty variable)
    checks without a cache. A cache that cannot be opened or written is left alone. Digests
    and decodes run in ``workers`` threads (default: one per CPU; both release the GIL).
    """
    db = _open_check_cache(cache)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        keys = list(pool.map(_check_key, paths)) if db is not None else [None] * len(paths)
        known = _cached_verdicts(db, [k for k in keys if k is not None]) if db is not None else {}
        todo = [i for i, key in enumerate(keys) if key is None or key not in known]
        found = dict(zip(todo, pool.map(lambda i: check_image(paths[i]), todo), strict=True))
    if db is not None:
        fresh = [(keys[i], found[i] or "") for i in todo if keys[i] is not None]
        try:
            with db:
                db.executemany("INSERT OR REPLACE INTO checks VALUES (?, ?)", fresh)
        except sqlite3.Error:
            pass  # a read-only or locked cache only costs speed
        db.close()
    return [found[i] if i in found else known[keys[i]] for i in range(len(keys))]


def checked_readable(
    paths: Sequence[str | os.PathLike],
    cache: str | os.PathLike | None = "default",
    workers: int | None = None,
) -> list[bool]:
    """Per file, whether the verdict cache of :func:`check_images` already says "readable"
    for its content as it is now (digests in ``workers`` threads). Nothing is decoded: a file
    never checked, changed since, or found unreadable gets ``False``, and so does every file
    when there is no cache (``cache`` as in :func:`check_images`)."""
    db = _open_check_cache(cache)
    if db is None:
        return [False] * len(paths)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        keys = list(pool.map(_check_key, paths))
    known = _cached_verdicts(db, [k for k in keys if k is not None])
    db.close()
    return [key in known and known[key] is None for key in keys]


def _plain_png(path: Path) -> bool:
    """An 8-bit gray or RGB PNG without transparency, animation or an orientation (``eXIf``
    chunk, or a text chunk under a key Pillow reads one from), from the chunk headers alone:
    Pillow finds the chunks after the image data only by decoding it."""
    for kind, _, data in png_chunks(path):
        if kind == b"IHDR" and data[8:10] not in (b"\x08\x00", b"\x08\x02"):
            return False
        if kind in (b"tRNS", b"acTL", b"eXIf") or data.split(b"\0")[0] in _PNG_ORIENTATION_KEYS:
            return False
        if kind == b"IEND":
            return True
    return False


# --------------------------------------------------------------------------- check cache


def _check_key(path: str | os.PathLike) -> str | None:
    """Cache key of one file's verdict: the version of the check and a BLAKE2b digest of the
    file's bytes (``None`` for anything but a readable regular file, which is never opened: a
    pipe would block; never cached)."""
    if not Path(path).is_file():
        return None
    try:
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=_DIGEST_BYTES))
    except OSError:
        return None
    return f"{_CHECK_VERSION}:{digest.hexdigest()}"


def _open_check_cache(cache: str | os.PathLike | None) -> sqlite3.Connection | None:
    """The verdict cache as an open SQLite connection, or ``None`` (no cache wanted, or it
    cannot be opened)."""
    if cache == "default":
        cache = os.environ.get(CHECK_CACHE_ENV, str(Path.home() / ".cache/pneumo/image-checks.sqlite"))
    if not cache:
        return None
    try:
        Path(cache).expanduser().parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(Path(cache).expanduser(), timeout=30)
        db.execute("CREATE TABLE IF NOT EXISTS checks (key TEXT PRIMARY KEY, problem TEXT)")
        return db
    except (OSError, sqlite3.Error):
        return None


def _cached_verdicts(db: sqlite3.Connection, keys: list[str]) -> dict[str, str | None]:
    """Verdicts of ``keys`` found in the cache (``None`` = readable)."""
    found: dict[str, str | None] = {}
    try:
        for start in range(0, len(keys), 500):
            chunk = keys[start: start + 500]
            marks = ",".join("?" * len(chunk))
            rows = db.execute(f"SELECT key, problem FROM checks WHERE key IN ({marks})", chunk)
            found.update((key, problem or None) for key, problem in rows)
    except sqlite3.Error:
        return {}
    return found
