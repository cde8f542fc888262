"""Reading one chest X-ray file (JPEG, PNG or DICOM) into a ``(H, W, 3)`` uint8 RGB array.

Public data sets mix grayscale and colour JPEGs, 8- and 16-bit PNGs and DICOM files, and
usually contain a few broken files (truncated downloads, zero-byte files, macOS ``._``
metadata files). Everything here either returns a clean 3-channel uint8 array or raises
:class:`ImageReadError` with a one-line message naming the file, so a data-set scan can
list the problems instead of crashing half-way through an epoch.

Choices worth knowing:

* Damaged files are errors. Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left at its
  default (``False``), and every JPEG is also decoded by libjpeg-turbo in strict mode
  (``simplejpeg``), which turns libjpeg's "corrupt data" warnings into errors: a JPEG cut
  short and given a new end marker, or with bytes overwritten, decodes in Pillow without a
  word but would give a wrong picture. PNG chunk checksums are verified for the same
  reason.
* Memory per image is bounded. JPEGs read with a ``max_side`` or target size are decoded at
  1/2, 1/4 or 1/8 scale by libjpeg itself (``Image.draft``). Every other decode (PNG, DICOM,
  progressive JPEG, whose decoder holds the whole image's coefficients) is refused above
  :data:`PIXEL_BUDGET` pixels, checked from the header before any pixel is decoded; within
  the budget Pillow holds at most 4 bytes per pixel (about 150 MB). Pillow's
  decompression-bomb guard stays on, raised to :data:`MAX_PIXELS`.
* EXIF orientation is applied (``ImageOps.exif_transpose``): a phone photo of a film
  stored sideways is read upright. :func:`read_header` reports the tag.
* 16-bit PNGs are divided by 257 (full 16-bit range -> 0..255), which keeps brightness
  comparable between files. When the largest value is below 4096 the data is taken to be
  10- or 12-bit detector data stored in 16 bits and is min-max stretched instead (dividing
  by 257 would give an almost black image). 32-bit integer and float images are always
  min-max stretched.
* DICOM: modality LUT (rescale), then VOI LUT or window centre/width mapped onto 0..255;
  without either, min-max. MONOCHROME1 (bright = low values) is inverted so that bone is
  always bright. Multi-frame files give their first frame. Read at a reduced size, the raw
  values are block-averaged before the LUTs, so the float copies stay small.
* Plain files can be decoded by TensorFlow instead (:func:`graph_decode`): 8-bit gray or RGB
  JPEG and PNG files, upright and undamaged, whose pixels TensorFlow's decoders reproduce
  given the reduced-scale settings that :func:`read_resized` would use.
"""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
import stat
import struct
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MIN_SIDE",
    "PIXEL_BUDGET",
    "GraphDecode",
    "ImageHeader",
    "ImageReadError",
    "check_image",
    "check_images",
    "checked_readable",
    "graph_decode",
    "image_warnings",
    "is_dicom",
    "is_image_file",
    "read_header",
    "read_image",
    "read_resized",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpeg", ".jpg", ".png", ".dcm", ".dicom"})
"""File extensions (lower-case, with the dot) treated as images by :func:`is_image_file`."""

DICOM_EXTENSIONS: frozenset[str] = frozenset({".dcm", ".dicom"})

MAX_PIXELS = 20_000 * 20_000
"""Largest image (width * height) opened at all: Pillow's decompression-bomb limit
(~89 Mpx, error above ~179 Mpx) is raised to this because big JPEGs are decoded at 1/8
scale. Above it, or above :data:`PIXEL_BUDGET` where no reduced decode exists, the file is
refused."""

PIXEL_BUDGET = 6_000 * 6_000
"""Most pixels decoded for one image (after the JPEG draft reduction): 36 Mpx, about
150 MB in Pillow's 4-bytes-per-pixel RGB. Chest radiographs are below 20 Mpx."""

MAX_DICOM_BYTES = 128 * 2**20
"""Largest DICOM data set read (128 MiB): a deflated file's inflated size, checked while
inflating in blocks, and one frame's decoded pixels (rows x columns x samples x bits
allocated), checked from the header before any pixel is decompressed. A 36 Mpx 16-bit
radiograph is 72 MB."""

MIN_SIDE = 32
"""Images with a side shorter than this (in pixels) are refused: they carry no detail a
model could read."""

CHECK_CACHE_ENV = "PNEUMO_CHECK_CACHE"
"""Environment variable naming the cache file of :func:`check_images` (empty: no cache)."""

_CHECK_VERSION = "3"  # part of the cache key: a change to what check_image tests invalidates it
_PIL_LIMIT_LOCK = threading.Lock()
_ORIENTATION_TAG = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # these swap width and height
_PNG_ORIENTATION_KEYS = (b"Raw profile type exif", b"XML:com.adobe.xmp")  # text keys Pillow reads


class ImageReadError(ValueError):
    """An image file exists but cannot be decoded (corrupt, truncated, empty, not an image).

    ``str(err)`` is ``"cannot read <path>: <reason>"``; ``err.path`` and ``err.reason`` hold
    the parts separately.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        # Both parts go to super() so that the exception survives pickling
        # (multiprocessing workers, tf.data py_function).
        super().__init__(str(path), reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot read {self.path}: {self.reason}"


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says: stored ``width`` and ``height`` (before EXIF rotation),
    ``format`` (``JPEG``, ``PNG``, ``DICOM``, ...), ``mode`` (Pillow mode, or the DICOM
    photometric interpretation) and the EXIF ``orientation`` (1 = upright)."""

    width: int
    height: int
    format: str
    mode: str
    orientation: int = 1

    @property
    def upright_size(self) -> tuple[int, int]:
        """``(width, height)`` as displayed, after the EXIF orientation is applied."""
        if self.orientation in _TRANSPOSED_ORIENTATIONS:
            return self.height, self.width
        return self.width, self.height


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


def is_image_file(path: str | os.PathLike) -> bool:
    """True when ``path`` has an image extension and is not a hidden/metadata file.

    Only the name is looked at (no file system access). Names starting with a dot are
    rejected: ``.DS_Store`` and macOS AppleDouble files such as ``._person1_virus_1.jpeg``
    (which carry a ``.jpeg`` extension but hold no image). ``Thumbs.db`` and friends fail
    the extension test.
    """
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def is_dicom(path: str | os.PathLike) -> bool:
    """DICOM by content (``DICM`` at offset 128; many PACS exports have no extension), else
    by extension unless the file starts like a JPEG or PNG (a misnamed export)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(132)
    if head[128:132] == b"DICM":
        return True
    if head.startswith((b"\xff\xd8\xff", b"\x89PNG")):
        return False
    return path.suffix.lower() in DICOM_EXTENSIONS


def read_header(path: str | os.PathLike) -> ImageHeader:
    """Size, format, mode and EXIF orientation from the file header, without decoding pixels.

    Raises ``FileNotFoundError`` for a missing file and :class:`ImageReadError` for one
    that is not a readable image.
    """
    path = Path(path)
    size = _file_size(path)
    try:
        if is_dicom(path):
            ds = _read_dicom(path, stop_before_pixels=True)
            return ImageHeader(int(ds.Columns), int(ds.Rows), "DICOM",
                               str(ds.get("PhotometricInterpretation", "?")))
        with _open_pil(path) as im:
            return ImageHeader(im.width, im.height, str(im.format), im.mode, _orientation(im))
    except (ImageReadError, MemoryError):
        raise
    except Exception as exc:
        raise ImageReadError(path, _describe(exc, path, size)) from exc


def read_image(path: str | os.PathLike, max_side: int | None = None) -> np.ndarray:
    """Read an image file as an upright ``(H, W, 3)`` uint8 RGB array.

    ``max_side`` caps the longest side (aspect ratio kept, ``cv2.INTER_AREA``); JPEGs are
    then decoded at reduced scale so a huge file never needs full-resolution memory.

    Raises ``FileNotFoundError`` for a missing file and :class:`ImageReadError` for a file
    that cannot be decoded or is too large to decode within :data:`PIXEL_BUDGET`.
    """
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be a positive integer, got {max_side!r}")
    target = (max_side, max_side) if max_side else None
    arr = _decode(Path(path), target)
    h, w = arr.shape[:2]
    if max_side and max(h, w) > max_side:
        scale = max_side / max(h, w)
        new_wh = (max(1, round(w * scale)), max(1, round(h * scale)))
        arr = cv2.resize(arr, new_wh, interpolation=cv2.INTER_AREA)
    return _to_rgb(arr)


def read_resized(path: str | os.PathLike, size: int | tuple[int, int]) -> np.ndarray:
    """Read an image and resize it to ``size`` (an int, or ``(height, width)``).

    The aspect ratio is not kept: the whole image is stretched to the target, as in the
    Kermany et al. preprocessing. ``cv2.INTER_AREA`` is used when shrinking (the usual
    case) and bilinear interpolation when enlarging either side. Files are first decoded at
    the smallest reduced size that is still at least twice the target (libjpeg's 1/2, 1/4
    or 1/8 scale for JPEGs; block averages of the raw values for DICOM).
    """
    is_int = isinstance(size, (int, np.integer))
    out_h, out_w = (int(size), int(size)) if is_int else (int(size[0]), int(size[1]))
    if out_h < 1 or out_w < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    arr = _decode(Path(path), (2 * out_w, 2 * out_h))
    h, w = arr.shape[:2]
    if (h, w) != (out_h, out_w):
        shrinking = out_h <= h and out_w <= w
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        arr = cv2.resize(arr, (out_w, out_h), interpolation=interpolation)
    return _to_rgb(arr)


def graph_decode(path: str | os.PathLike, size: int, verified: bool = False) -> GraphDecode | None:
    """How to decode ``path`` with TensorFlow so that the pixels equal ``read_resized(path,
    size)``, or ``None`` when only :func:`read_resized` reads it as intended.

    TensorFlow's decoders cover 8-bit gray or RGB JPEG and PNG files: upright (EXIF
    orientation 1), no palette, alpha, transparency, CMYK or animation, at most
    :data:`PIXEL_BUDGET` pixels. The file must also pass the damage checks that
    :func:`read_resized` makes before decoding (a strict libjpeg pass at 1/8 scale, PNG chunk
    checksums): TensorFlow decodes a JPEG with corrupt data to a wrong picture without an
    error, so a damaged file gets ``None`` and is left to :func:`read_resized`, whose
    :class:`ImageReadError` names it. ``verified=True`` skips that check for a file that
    already passed :func:`check_image` as it is now (see :func:`checked_readable`). Costs a
    header read and the check, no full decode; never raises for an unreadable file.
    """
    path = Path(path)
    target = 2 * int(size)  # read_resized decodes at no less than twice the output size
    try:
        file_size = _file_size(path)
        if is_dicom(path):
            return None
        with _open_pil(path) as im:
            width, height = im.size
            if im.mode not in ("L", "RGB") or width * height > PIXEL_BUDGET:
                return None
            if im.format == "JPEG" and len(im.tile) == 1 and _orientation(im) == 1:
                scale = min(width // target, height // target)
                ratio = max(s for s in (1, 2, 4, 8) if s <= max(scale, 1))  # as Image.draft
                width, height = -(-width // ratio), -(-height // ratio)
                if not verified:
                    _verify_jpeg(path)
            elif im.format == "PNG" and _plain_png(path):
                ratio = 1
                if not verified:
                    _verify_png(path, file_size)
            else:
                return None
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
        _decode(path, (64, 64))
        header = read_header(path)
    except FileNotFoundError:
        return "file not found"
    except ImageReadError as exc:
        return exc.reason
    except MemoryError:
        raise
    except Exception as exc:
        return _describe(exc, path)
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

    Verdicts are cached by absolute path, size and modification time in an SQLite file, so
    a data set is decoded once, not on every load: ``cache="default"`` uses the file named
    by the ``PNEUMO_CHECK_CACHE`` environment variable, else
    ``~/.cache/pneumo/image-checks.sqlite``; ``None`` (or an empty variable) checks
    without a cache. A cache that cannot be opened or written is left alone. Files not in
    the cache are decoded in ``workers`` threads (default: one per CPU; the decoders
    release the GIL).
    """
    keys = [_check_key(Path(p)) for p in paths]
    db = _open_check_cache(cache)
    known: dict[str, str | None] = {}
    if db is not None:
        known = _cached_verdicts(db, [k for k in keys if k is not None])
    todo = sorted({i for i, key in enumerate(keys) if key is None or key not in known})
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
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
    paths: Sequence[str | os.PathLike], cache: str | os.PathLike | None = "default"
) -> list[bool]:
    """Per file, whether the verdict cache of :func:`check_images` already says "readable"
    for it as it is now (same absolute path, size and modification time). Nothing is decoded:
    a file never checked, changed since, or found unreadable gets ``False``, and so does
    every file when there is no cache (``cache`` as in :func:`check_images`)."""
    keys = [_check_key(Path(p)) for p in paths]
    db = _open_check_cache(cache)
    if db is None:
        return [False] * len(keys)
    known = _cached_verdicts(db, [k for k in keys if k is not None])
    db.close()
    return [key in known and known[key] is None for key in keys]


def image_warnings(image: np.ndarray) -> list[str]:
    """Reasons to doubt that an RGB ``uint8`` array is a chest radiograph (may be empty).

    Flags a nearly uniform picture (grey-level spread below 4), a noise-like one (the mean
    difference between neighbouring pixels is as large as the spread itself, which smooth
    anatomy never gives) and a strongly coloured one (radiographs are gray). A model scores
    such inputs anyway, so the caller shows these beside the prediction.
    """
    arr = np.asarray(image, dtype=np.float32)
    gray = arr.mean(axis=-1) if arr.ndim == 3 else arr
    spread = float(gray.std())
    notes = []
    if spread < 4.0:
        notes.append(f"nearly uniform image (grey-level spread {spread:.1f}): not a radiograph?")
    else:
        steps = (np.abs(np.diff(gray, axis=0)).mean() + np.abs(np.diff(gray, axis=1)).mean()) / 2
        if steps > 0.6 * spread:
            notes.append(f"looks like noise, not anatomy (neighbouring pixels differ by "
                         f"{steps:.0f} grey levels on average, spread {spread:.0f})")
    if arr.ndim == 3 and arr.shape[-1] >= 3:
        colour = float(np.abs(arr[..., :3] - arr[..., :3].mean(axis=-1, keepdims=True)).mean())
        if colour > 12.0:
            notes.append(f"colour image (mean channel difference {colour:.0f}); chest X-rays "
                         "are grayscale")
    return notes


# --------------------------------------------------------------------------- internals


def _file_size(path: Path) -> int:
    """Size of a regular file in bytes. ``FileNotFoundError`` naming the path; for anything
    that is not a non-empty regular file, :class:`ImageReadError` saying what it is."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageReadError(path, "symbolic link loop (the link leads back to itself)") from None
        raise ImageReadError(path, f"cannot access the file: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageReadError(path, "is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):
        raise ImageReadError(path, "not a regular file (a device, pipe or socket), not an image")
    if info.st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    return info.st_size


def _decode(path: Path, target: tuple[int, int] | None) -> np.ndarray:
    """Decode ``path`` to uint8, either ``(H, W)`` gray or ``(H, W, 3)`` RGB, upright.

    ``target`` is the upright ``(width, height)`` the decoder may reduce to (never below).
    """
    size = _file_size(path)
    try:
        if is_dicom(path):
            return _decode_dicom(path, target)
        with _open_pil(path) as im:
            orientation = _orientation(im)
            if target is not None and orientation in _TRANSPOSED_ORIENTATIONS:
                target = target[::-1]
            is_jpeg = im.format in ("JPEG", "MPO")
            full = im.size
            if is_jpeg and target is not None:
                im.draft(None, target)  # libjpeg decodes at 1/2, 1/4 or 1/8 scale
            _check_budget(path, im, full)
            if is_jpeg:
                _verify_jpeg(path)
            elif im.format == "PNG":
                _verify_png(path, size)
            im.load()
            if orientation != 1:
                ImageOps.exif_transpose(im, in_place=True)
            return _pil_to_array(_reduce(im, target))
    except (ImageReadError, MemoryError):
        raise
    except Exception as exc:
        raise ImageReadError(path, _describe(exc, path, size)) from exc


def _check_budget(path: Path, im: Image.Image, full: tuple[int, int]) -> None:
    """Refuse, before decoding, an image that would need more than :data:`PIXEL_BUDGET`
    pixels of memory (``im.size`` is already the draft size of a JPEG; a progressive JPEG
    needs the full image's coefficients whatever the draft size)."""
    decoded = full[0] * full[1] if _progressive(im) else im.size[0] * im.size[1]
    if decoded <= PIXEL_BUDGET:
        return
    kind = f"{im.format}{', progressive' if _progressive(im) else ''}"
    raise ImageReadError(
        path,
        f"image too large to decode safely ({full[0]} x {full[1]} px, {kind}: "
        f"{decoded / 1e6:.0f} Mpx to decode, limit {PIXEL_BUDGET / 1e6:.0f} Mpx); downscale the "
        "file (e.g. to 4096 px on its longest side) and try again",
    )


def _progressive(im: Image.Image) -> bool:
    """A progressive JPEG: libjpeg keeps every coefficient of the full image whatever the
    output scale, so the draft reduction does not bound its memory."""
    return bool(im.info.get("progressive") or im.info.get("progression"))


def _verify_jpeg(path: Path) -> None:
    """Decode the JPEG with libjpeg-turbo in strict mode at 1/8 scale; its "corrupt data"
    warnings (premature end of data segment, extraneous bytes, bad Huffman code), which
    Pillow ignores, become an :class:`ImageReadError`."""
    data = path.read_bytes()
    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", min_factor=8, strict=True)
    except ValueError as exc:
        text = " ".join(str(exc).split())
        kind = "truncated" if "premature end of jpeg file" in text.lower() else "damaged"
        raise ImageReadError(
            path, f"{kind} JPEG data (file is {len(data)} bytes): libjpeg says {text!r}"
        ) from None


def _verify_png(path: Path, size: int) -> None:
    """Check every PNG chunk's CRC (``Image.verify``). Pillow's decoder does not, and stops
    inflating once it has every row, so bytes overwritten inside the image data would
    otherwise give a wrong picture without an error."""
    try:
        with _open_pil(path) as im:
            im.verify()
    except (SyntaxError, OSError, ValueError) as exc:
        text = " ".join(str(exc).split())
        kind = "truncated" if "truncated" in text.lower() else "damaged"
        raise ImageReadError(path, f"{kind} PNG data (file is {size} bytes): {text}") from None


def _plain_png(path: Path) -> bool:
    """An 8-bit gray or RGB PNG without transparency, animation or an orientation (``eXIf``
    chunk, or a text chunk under a key Pillow reads one from), from the chunk headers alone:
    Pillow finds the chunks after the image data only by decoding it."""
    with open(path, "rb") as handle:
        handle.seek(8)
        while len(head := handle.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            data = handle.read(min(length, 32)) if kind in (b"IHDR", b"tEXt", b"zTXt", b"iTXt") else b""
            if kind == b"IHDR" and data[8:10] not in (b"\x08\x00", b"\x08\x02"):
                return False
            if kind in (b"tRNS", b"acTL", b"eXIf") or data.split(b"\0")[0] in _PNG_ORIENTATION_KEYS:
                return False
            if kind == b"IEND":
                return True
            handle.seek(length + 4 - len(data), os.SEEK_CUR)
    return False


def _reduce(im: Image.Image, target: tuple[int, int] | None) -> Image.Image:
    """Box-reduce ``im`` by the largest integer factor that keeps it at least ``target``
    (formats without a reduced decode), so the array copies stay small."""
    if target is None:
        return im
    k = min(im.width // max(1, target[0]), im.height // max(1, target[1]))
    if k < 2:
        return im
    if im.mode.startswith("I;16"):  # Image.reduce does not take 16-bit modes
        return Image.fromarray(_block_mean(np.asarray(im), k))
    if im.mode not in ("L", "RGB", "RGBA", "LA", "I", "F"):
        return im
    return im.reduce(k)


def _describe(exc: BaseException, path: Path, size: int | None = None) -> str:
    """Turn a decoder exception into a short one-line reason."""
    text = " ".join(str(exc).split())
    if size is None:
        size = path.stat().st_size if path.is_file() else 0
    if isinstance(exc, UnidentifiedImageError):
        return f"not a JPEG, PNG or DICOM image (unrecognised content, {size} bytes)"
    if "truncated" in text.lower():
        kind = path.suffix.lstrip(".").upper() or "image"
        return f"truncated {kind} data (file is {size} bytes): {text}"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"image too large (limit {MAX_PIXELS} pixels): {text}"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _open_pil(path: Path) -> Image.Image:
    """``Image.open`` with the decompression-bomb limit raised to :data:`MAX_PIXELS`.

    Pillow reads the limit from a module global when the file is opened; it is raised
    only for the duration of the call (under a lock) so other code keeps Pillow's default.
    Anything above the limit raises instead of merely warning.
    """
    with _PIL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        if saved is not None:
            Image.MAX_IMAGE_PIXELS = max(saved, MAX_PIXELS)
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1 when absent or invalid).

    Pillow finds a PNG's ``eXIf`` chunk after the image data only by decoding the whole
    image, so a non-JPEG image over :data:`PIXEL_BUDGET` is taken as upright here, without
    reading the tag: the decode that follows refuses it anyway."""
    if im.format not in ("JPEG", "MPO") and im.width * im.height > PIXEL_BUDGET:
        return 1
    try:
        value = int(im.getexif().get(_ORIENTATION_TAG, 1))
    except (ValueError, TypeError, OSError, SyntaxError):
        return 1
    return value if 1 <= value <= 8 else 1


def _pil_to_array(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> uint8 gray ``(H, W)`` or RGB ``(H, W, 3)``; alpha is dropped."""
    mode = im.mode
    if mode in ("L", "RGB"):
        return np.asarray(im)
    if mode in ("1", "LA", "La"):
        return np.asarray(im.convert("L"))
    if mode in ("P", "PA"):
        # via RGBA: Pillow warns when converting palette+transparency straight to RGB
        return np.asarray(im.convert("RGBA"))[..., :3]
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_uint8(np.asarray(im))
    return np.asarray(im.convert("RGB"))  # RGBA, RGBX, CMYK, YCbCr, ...


def _high_depth_to_uint8(arr: np.ndarray) -> np.ndarray:
    """16/32-bit integer or float gray image -> uint8 (see the module docstring for why)."""
    if arr.ndim == 3:  # e.g. 16-bit RGB decoded by some plugins: use luminance only
        arr = arr[..., :3].mean(axis=-1)
    is_int = np.issubdtype(arr.dtype, np.integer) and arr.size > 0
    if is_int and arr.min() >= 0 and 4096 <= arr.max() <= 65535:
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    return _minmax_to_uint8(arr)


def _minmax_to_uint8(arr: np.ndarray, lo: float | None = None, hi: float | None = None):
    """Map ``[lo, hi]`` (default: the array's finite min/max) linearly onto 0..255."""
    a = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo = float(a.min()) if lo is None else lo
    hi = float(a.max()) if hi is None else hi
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    a -= lo
    a *= 255.0 / (hi - lo)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _read_dicom(path: Path, stop_before_pixels: bool = False):
    """``pydicom.dcmread``; a ``.dcm`` without the 128-byte preamble + ``DICM`` is read as a
    raw data set (a non-DICOM file with the extension then fails with "no pixel data")."""
    import pydicom  # imported lazily: only DICOM users pay for it
    from pydicom.errors import InvalidDicomError

    _check_deflated_size(path)
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, defer_size="1 MB")
    except InvalidDicomError:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, defer_size="1 MB",
                               force=True)


def _check_deflated_size(path: Path) -> None:
    """Refuse a deflated DICOM (transfer syntax 1.2.840.10008.1.2.1.99) whose data set
    inflates to more than :data:`MAX_DICOM_BYTES`: pydicom inflates it whole into memory,
    deferred elements included, so 1 MB can hold a 1 GiB private element. Inflated here in
    1 MiB blocks that are counted and dropped."""
    import zlib

    from pydicom.filereader import read_file_meta_info

    with open(path, "rb") as handle:
        if handle.read(132)[128:132] != b"DICM":
            return
    try:
        meta = read_file_meta_info(path)
    except Exception:  # pydicom reports the damage when the file is read
        return
    if str(meta.get("TransferSyntaxUID", "")) != "1.2.840.10008.1.2.1.99":
        return
    offset = 132 + 12 + int(meta.get("FileMetaInformationGroupLength", 0) or 0)
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    with open(path, "rb") as handle:
        handle.seek(offset)
        pending = b""
        while total <= MAX_DICOM_BYTES:
            pending = pending or handle.read(2**20)
            if not pending:
                return
            try:
                total += len(inflater.decompress(pending, 2**20))
            except zlib.error:
                return
            pending = inflater.unconsumed_tail
            if inflater.eof:
                return
    raise ImageReadError(
        path, f"deflated DICOM data set inflates to more than {MAX_DICOM_BYTES / 2**20:.0f} MiB "
        "(a radiograph needs less); re-export the study uncompressed or with image compression",
    )


def _check_dicom_frame_size(path: Path, ds) -> None:
    """Refuse a DICOM whose first frame would decode to more than :data:`MAX_DICOM_BYTES`
    (rows x columns x samples per pixel x bits allocated), before decompressing it."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 16) or 16)
    size = rows * cols * samples * max(bits, 8) // 8
    if size > MAX_DICOM_BYTES:
        raise ImageReadError(
            path, f"DICOM frame too large to decode safely ({cols} x {rows} px, {samples} "
            f"sample(s) of {bits} bits: {size / 2**20:,.0f} MiB, limit "
            f"{MAX_DICOM_BYTES / 2**20:.0f} MiB); downscale it and try again",
        )


def _decode_dicom(path: Path, target: tuple[int, int] | None) -> np.ndarray:
    """DICOM -> uint8 gray (or RGB for colour DICOMs); see the module docstring."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

    ds = _read_dicom(path)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(path, "DICOM file has no pixel data")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows * cols > PIXEL_BUDGET:
        raise ImageReadError(
            path,
            f"image too large to decode safely ({cols} x {rows} px, DICOM: {rows * cols / 1e6:.0f} "
            f"Mpx, limit {PIXEL_BUDGET / 1e6:.0f} Mpx); downscale it and try again",
        )
    _check_dicom_frame_size(path, ds)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    arr = pixel_array(ds, index=0) if n_frames > 1 else ds.pixel_array

    if int(ds.get("SamplesPerPixel", 1)) > 1:  # colour (already converted to RGB)
        return arr if arr.dtype == np.uint8 else _minmax_to_uint8(arr)

    if target is not None:
        arr = _block_mean(arr, min(arr.shape[1] // target[0], arr.shape[0] // target[1]))
    arr = apply_modality_lut(arr, ds)
    has_lut = bool(ds.get("VOILUTSequence"))
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    out = apply_voi_lut(arr, ds)
    if has_window and not has_lut:
        # the window maps onto the output range of the pixel data; recover that range by
        # pushing two extreme values through the same transform
        with np.errstate(over="ignore"):
            lo, hi = apply_voi_lut(np.array([-1e12, 1e12]), ds)
        gray = _minmax_to_uint8(out, float(lo), float(hi))
    else:
        gray = _minmax_to_uint8(out)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        gray = 255 - gray
    return gray


def _block_mean(arr: np.ndarray, k: int) -> np.ndarray:
    """Mean of each ``k x k`` block (partial blocks at the edges too), rounded back to the
    array's own dtype so that the DICOM LUTs see the same kind of values; ``k < 2`` returns
    ``arr``. Rows are summed first, so the float64 intermediate is ``1/k`` of the image."""
    if k < 2:
        return arr
    row_starts, col_starts = np.arange(0, arr.shape[0], k), np.arange(0, arr.shape[1], k)
    sums = np.add.reduceat(np.add.reduceat(arr, row_starts, axis=0, dtype=np.float64),
                           col_starts, axis=1)
    rows = np.minimum(k, arr.shape[0] - row_starts)
    cols = np.minimum(k, arr.shape[1] - col_starts)
    means = sums / (rows[:, None] * cols[None, :])
    if np.issubdtype(arr.dtype, np.integer):
        return np.rint(means).astype(arr.dtype)
    return means.astype(arr.dtype)


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """Gray ``(H, W)`` -> ``(H, W, 3)``; contiguous uint8 either way."""
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr, dtype=np.uint8)


# --------------------------------------------------------------------------- check cache


def _check_key(path: Path) -> str | None:
    """Cache key of one file's verdict: absolute path, size, modification time and the
    version of the check (``None`` when the file cannot be stat-ed: never cached)."""
    try:
        info = path.stat()
    except OSError:
        return None
    text = f"{_CHECK_VERSION}\0{path.resolve()}\0{info.st_size}\0{info.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()


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
