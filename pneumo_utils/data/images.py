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
  reason, and a PNG with a critical chunk libpng does not know is refused
  (:data:`PNG_CRITICAL_CHUNKS`).
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
* DICOM files are read by :mod:`pneumo_utils.data.dicom` (LUTs, windowing, MONOCHROME1).

Which files TensorFlow may decode instead, and the cached damage checks of whole data sets,
live in :mod:`pneumo_utils.data.image_checks`.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

from pneumo_utils.data.dicom import decode_dicom, dicom_header, is_dicom
from pneumo_utils.data.pixels import (
    MAX_PIXELS,
    PIXEL_BUDGET,
    ImageReadError,
    block_mean,
    minmax_to_uint8,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "MIN_SIDE",
    "PIXEL_BUDGET",
    "PNG_CRITICAL_CHUNKS",
    "ImageHeader",
    "ImageReadError",
    "image_warnings",
    "is_image_file",
    "read_header",
    "read_image",
    "read_resized",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpeg", ".jpg", ".png", ".dcm", ".dicom"})
"""File extensions (lower-case, with the dot) treated as images by :func:`is_image_file`."""

MIN_SIDE = 32
"""Images with a side shorter than this (in pixels) are refused: they carry no detail a
model could read."""
PNG_CRITICAL_CHUNKS: frozenset[bytes] = frozenset({b"IHDR", b"PLTE", b"IDAT", b"IEND"})
"""The critical PNG chunks a decoder must know (PNG 1.2). A chunk whose type starts with an
upper-case letter is critical: libpng, and so TensorFlow's ``decode_png``, refuses a file with
one it does not know, while Pillow skips it; such a file is refused here too, so every decoder
the pipelines use agrees."""

_PIL_LIMIT_LOCK = threading.Lock()
_ORIENTATION_TAG = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # these swap width and height


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


def is_image_file(path: str | os.PathLike) -> bool:
    """True when ``path`` has an image extension and is not a hidden/metadata file.

    Only the name is looked at (no file system access). Names starting with a dot are
    rejected: ``.DS_Store`` and macOS AppleDouble files such as ``._person1_virus_1.jpeg``
    (which carry a ``.jpeg`` extension but hold no image). ``Thumbs.db`` and friends fail
    the extension test.
    """
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS



def read_header(path: str | os.PathLike) -> ImageHeader:
    """Size, format, mode and EXIF orientation from the file header, without decoding pixels.

    Raises ``FileNotFoundError`` for a missing file and :class:`ImageReadError` for one
    that is not a readable image.
    """
    path = Path(path)
    size = file_size(path)
    try:
        if is_dicom(path):
            columns, rows, photometric = dicom_header(path)
            return ImageHeader(columns, rows, "DICOM", photometric)
        with open_pil(path) as im:
            return ImageHeader(im.width, im.height, str(im.format), im.mode, exif_orientation(im))
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


def file_size(path: Path) -> int:
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
    size = file_size(path)
    try:
        if is_dicom(path):
            return decode_dicom(path, target)
        with open_pil(path) as im:
            orientation = exif_orientation(im)
            if target is not None and orientation in _TRANSPOSED_ORIENTATIONS:
                target = target[::-1]
            is_jpeg = im.format in ("JPEG", "MPO")
            full = im.size
            if is_jpeg and target is not None:
                im.draft(None, target)  # libjpeg decodes at 1/2, 1/4 or 1/8 scale
            _check_budget(path, im, full)
            if is_jpeg:
                verify_jpeg(path)
            elif im.format == "PNG":
                verify_png(path, size)
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


def verify_jpeg(path: Path) -> None:
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


def verify_png(path: Path, size: int) -> None:
    """Check every PNG chunk's type and CRC (``Image.verify``). Pillow's decoder checks
    neither: it skips a critical chunk it does not know, which libpng (TensorFlow's
    ``decode_png``) refuses (see :data:`PNG_CRITICAL_CHUNKS`), and it stops inflating once it
    has every row, so bytes overwritten inside the image data would otherwise give a wrong
    picture without an error."""
    for kind, _, _ in png_chunks(path):
        if not kind.isalpha() or (kind[:1].isupper() and kind not in PNG_CRITICAL_CHUNKS):
            name = kind.decode("latin-1")
            raise ImageReadError(
                path, f"PNG holds an unknown critical chunk {name!r} (file is {size} bytes), which "
                "libpng and TensorFlow refuse to decode; re-save it as a plain PNG",
            )
    try:
        with open_pil(path) as im:
            im.verify()
    except (SyntaxError, OSError, ValueError) as exc:
        text = " ".join(str(exc).split())
        kind = "truncated" if "truncated" in text.lower() else "damaged"
        raise ImageReadError(path, f"{kind} PNG data (file is {size} bytes): {text}") from None


def png_chunks(path: Path) -> Iterator[tuple[bytes, int, bytes]]:
    """``(type, length, first bytes)`` of each chunk of a PNG file, from the chunk headers
    alone (the first 32 bytes of ``IHDR`` and the text chunks, nothing of the others), up to
    ``IEND`` or the end of the file."""
    with open(path, "rb") as handle:
        handle.seek(8)
        while len(head := handle.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            data = handle.read(min(length, 32)) if kind in (b"IHDR", b"tEXt", b"zTXt", b"iTXt") else b""
            yield kind, length, data
            if kind == b"IEND":
                return
            handle.seek(length + 4 - len(data), os.SEEK_CUR)


def _reduce(im: Image.Image, target: tuple[int, int] | None) -> Image.Image:
    """Box-reduce ``im`` by the largest integer factor that keeps it at least ``target``
    (formats without a reduced decode), so the array copies stay small."""
    if target is None:
        return im
    k = min(im.width // max(1, target[0]), im.height // max(1, target[1]))
    if k < 2:
        return im
    if im.mode.startswith("I;16"):  # Image.reduce does not take 16-bit modes
        return Image.fromarray(block_mean(np.asarray(im), k))
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


def open_pil(path: Path) -> Image.Image:
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


def exif_orientation(im: Image.Image) -> int:
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
    return minmax_to_uint8(arr)



def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """Gray ``(H, W)`` -> ``(H, W, 3)``; contiguous uint8 either way."""
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr, dtype=np.uint8)

