"""Reading one chest X-ray file (JPEG, PNG or DICOM) into a ``(H, W, 3)`` uint8 RGB array.

Public data sets mix grayscale and colour JPEGs, 8- and 16-bit PNGs and DICOM files, and
usually contain a few broken files (truncated downloads, zero-byte files, macOS ``._``
metadata files). Everything here either returns a clean 3-channel uint8 array or raises
:class:`ImageReadError` with a one-line message naming the file, so a data-set scan can
list the problems instead of crashing half-way through an epoch.

Choices worth knowing:

* Truncated files are errors. Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left at its
  default (``False``); code that switches it on globally also makes this module accept
  truncated images, so don't.
* 16-bit PNGs are divided by 257 (full 16-bit range -> 0..255), which keeps brightness
  comparable between files. When the largest value is below 4096 the data is taken to be
  10- or 12-bit detector data stored in 16 bits and is min-max stretched instead (dividing
  by 257 would give an almost black image). 32-bit integer and float images are always
  min-max stretched.
* DICOM: modality LUT (rescale), then VOI LUT or window centre/width mapped onto 0..255;
  without either, min-max. MONOCHROME1 (bright = low values) is inverted so that bone is
  always bright. Multi-frame files give their first frame.
* EXIF orientation is not applied (the Kermany images are stored upright and the
  published preprocessing ignores it).
* Large JPEGs are decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself (``Image.draft``)
  whenever a ``max_side`` or target size is given, so memory stays bounded.
* PNG has no reduced-scale decoding, and Pillow keeps a decoded RGB image at 4 bytes per
  pixel, so an 8000 x 8000 RGB PNG would need 256 MB (about 600 MB of peak memory with the
  array copies). PNGs of at least :data:`PNG_STREAM_MIN_PIXELS` pixels that are read with a
  ``max_side`` or target size are therefore decoded in strips of about 1 MB: each strip is
  unfiltered by Pillow and box-averaged by an integer factor (as ``Image.reduce`` would)
  before the next one is read, so peak memory grows by about 30 MB at most (measured for
  8000 x 8000 RGB) whatever the image size.
  This covers non-interlaced 8-bit PNGs of every colour type and 16-bit grayscale (with or
  without alpha); the rare others (interlaced, 1/2/4-bit, 16-bit colour) are decoded in
  full, which needs about ``4 * width * height`` bytes (up to 3x that at the peak).
"""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "check_image",
    "is_image_file",
    "read_image",
    "read_resized",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpeg", ".jpg", ".png", ".dcm", ".dicom"})
"""File extensions (lower-case, with the dot) treated as images by :func:`is_image_file`."""

DICOM_EXTENSIONS: frozenset[str] = frozenset({".dcm", ".dicom"})

MAX_PIXELS = 20_000 * 20_000
"""Largest image (width * height) opened. Pillow's default limit (~89 Mpx, error above
~179 Mpx) guards against decompression bombs; we raise it because JPEGs are decoded
downscaled via ``draft`` and some scanners export very large files."""

PNG_STREAM_MIN_PIXELS = 4096 * 4096
"""PNGs with at least this many pixels, read at a reduced size, are decoded strip by strip
(see the module docstring); smaller ones are decoded in full by Pillow."""

_PNG_STRIP_BYTES = 2**20  # unfiltered bytes per strip of a streamed PNG
_CHECK_FULL_DECODE_BYTES = 64 * 1024  # check_image fully decodes files up to this size
_JPEG_EOI = b"\xff\xd9"
_PIL_LIMIT_LOCK = threading.Lock()


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


def is_image_file(path: str | os.PathLike) -> bool:
    """True when ``path`` has an image extension and is not a hidden/metadata file.

    Only the name is looked at (no file system access). Names starting with a dot are
    rejected: ``.DS_Store`` and macOS AppleDouble files such as ``._person1_virus_1.jpeg``
    (which carry a ``.jpeg`` extension but hold no image). ``Thumbs.db`` and friends fail
    the extension test.
    """
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def read_image(path: str | os.PathLike, max_side: int | None = None) -> np.ndarray:
    """Read an image file as an ``(H, W, 3)`` uint8 RGB array.

    ``max_side`` caps the longest side (aspect ratio kept, ``cv2.INTER_AREA``); JPEGs are
    then decoded at reduced scale so a huge file never needs full-resolution memory.

    Raises ``FileNotFoundError`` for a missing file and :class:`ImageReadError` for a file
    that cannot be decoded.
    """
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be a positive integer, got {max_side!r}")
    draft = (max_side, max_side) if max_side else None
    arr = _decode(Path(path), draft)
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
    case) and bilinear interpolation when enlarging either side. JPEGs are first decoded
    by libjpeg at the smallest 1/2, 1/4 or 1/8 scale that is still at least twice the target.
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


def check_image(path: str | os.PathLike) -> str | None:
    """Return ``None`` if ``path`` looks readable, else a one-line description of the problem.

    Meant for scanning thousands of files in seconds, so it does not decode every file:
    files up to 64 KB (and all DICOMs) are decoded (JPEGs at reduced scale); larger
    JPEGs are checked by header and by the end-of-image marker that a truncated download
    lacks (decoded only if that marker is missing), larger PNGs by their chunk checksums
    (``Image.verify``). A bit flip inside the compressed data of a large JPEG can slip
    through; :func:`read_image` still raises on it later.
    The description does not repeat the path.
    """
    path = Path(path)
    try:
        size = _file_size(path)
        if size <= _CHECK_FULL_DECODE_BYTES or _is_dicom(path):
            read_image(path, max_side=64)
            return None
        with _open_pil(path) as im:
            fmt = im.format
            if fmt in ("JPEG", "MPO"):
                with open(path, "rb") as f:
                    f.seek(max(0, size - 1024))
                    tail = f.read()
                if _JPEG_EOI not in tail:
                    read_image(path, max_side=64)  # raises if really truncated
            else:
                im.verify()
    except FileNotFoundError:
        return "file not found"
    except ImageReadError as exc:
        return exc.reason
    except MemoryError:
        raise
    except Exception as exc:
        return _describe(exc, path)
    return None


# --------------------------------------------------------------------------- internals


def _file_size(path: Path) -> int:
    """Size in bytes; FileNotFoundError naming the path, ImageReadError for empty files."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    if path.is_dir():
        raise ImageReadError(path, "is a directory, not an image file")
    if size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    return size


def _is_dicom(path: Path) -> bool:
    """DICOM by content (``DICM`` at offset 128; many PACS exports have no extension), else
    by extension unless the file starts like a JPEG or PNG (a misnamed export)."""
    with open(path, "rb") as f:
        head = f.read(132)
    if head[128:132] == b"DICM":
        return True
    if head.startswith((b"\xff\xd8\xff", b"\x89PNG")):
        return False
    return path.suffix.lower() in DICOM_EXTENSIONS


def _decode(path: Path, draft: tuple[int, int] | None) -> np.ndarray:
    """Decode ``path`` to uint8, either ``(H, W)`` gray or ``(H, W, 3)`` RGB.

    ``draft`` is the ``(width, height)`` the JPEG decoder may scale down to (never below).
    """
    size = _file_size(path)
    try:
        if _is_dicom(path):
            return _decode_dicom(path)
        with _open_pil(path) as im:
            if draft is not None and im.format == "PNG":
                reduced = _decode_png_reduced(path, draft)
                if reduced is not None:
                    return reduced
            if draft is not None:
                im.draft(None, draft)  # no-op for formats other than JPEG
            im.load()
            return _pil_to_array(im)
    except (ImageReadError, MemoryError):
        raise
    except Exception as exc:
        raise ImageReadError(path, _describe(exc, path, size)) from exc


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_PNG_TYPE_WITH_BYTES = {1: 0, 2: 4, 3: 2, 4: 6}  # 8-bit colour type with N bytes per pixel


def _decode_png_reduced(path: Path, draft: tuple[int, int]) -> np.ndarray | None:
    """A big PNG decoded strip by strip and box-reduced by an integer factor ``k``.

    ``k`` is the largest factor (at most 32) that keeps the result at least ``draft``
    (width, height), as ``Image.draft`` does for JPEGs; the caller resizes the rest.
    Returns ``None`` (decode in full instead) for small images, ``k < 2`` and PNG variants
    not handled here (see the module docstring).

    Each strip of ``k * m`` rows is inflated from the IDAT stream, wrapped into a small
    8-bit PNG whose first row is the previous strip's last unfiltered row (the filters
    refer to it) and whose colour type has the same bytes per pixel as the original, and
    decoded by Pillow: that undoes the PNG filters in C and yields the raw sample bytes,
    which are interpreted (palette, alpha, 16-bit) and summed per ``k x k`` block here.
    """
    with open(path, "rb") as f:
        if f.read(8) != _PNG_SIGNATURE:
            return None
        length, kind = struct.unpack(">I4s", f.read(8))
        if kind != b"IHDR" or length != 13:
            return None
        w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", f.read(13))
        f.read(4)  # CRC
        k = min(w // draft[0], h // draft[1], 32)  # capped: strips hold >= k rows
        supported = (depth == 8 and ctype in _PNG_CHANNELS) or (depth == 16 and ctype in (0, 4))
        if w * h < PNG_STREAM_MIN_PIXELS or k < 2 or interlace or not supported:
            return None
        bpp = _PNG_CHANNELS[ctype] * depth // 8
        row = w * bpp + 1  # one filter-type byte per row
        palette = np.zeros((256, 3), np.uint8)
        strip_rows = k * max(1, _PNG_STRIP_BYTES // (k * row))
        col_starts = np.arange(0, w, k)
        sums, prev, done = [], bytes(row - 1), 0
        lo, hi = np.inf, -np.inf
        for data in _png_inflate(f, strip_rows * row, palette):
            n = min(len(data) // row, h - done)
            if n == 0:
                break
            raw = _png_unfilter(prev + data[: n * row], w, n + 1, _PNG_TYPE_WITH_BYTES[bpp])
            raw = raw.reshape(n + 1, w, bpp)
            prev, raw = raw[-1].tobytes(), raw[1:]
            if depth == 16:  # big-endian gray (alpha, if any, dropped)
                values = (raw[..., 0].astype(np.uint32) << 8 | raw[..., 1])[..., None]
                lo, hi = min(lo, int(values.min())), max(hi, int(values.max()))
            elif ctype == 3:
                values = palette[raw[..., 0]]
            else:
                values = raw[..., : 1 if ctype in (0, 4) else 3]  # drop alpha
            # uint32 holds k rows of 16-bit samples; uint64 k x k blocks
            block = np.add.reduceat(values, np.arange(0, n, k), axis=0, dtype=np.uint32)
            sums.append(np.add.reduceat(block, col_starts, axis=1, dtype=np.uint64))
            done += n
    if done < h:
        size = path.stat().st_size
        raise ImageReadError(path, f"truncated PNG data (file is {size} bytes): {done} of {h} rows")
    rows_per_block = np.minimum(k, h - np.arange(0, h, k))
    cols_per_block = np.minimum(k, w - col_starts)
    means = np.concatenate(sums) / (rows_per_block[:, None, None] * cols_per_block[None, :, None])
    if depth == 16:
        if lo >= 0 and 4096 <= hi <= 65535:  # same rule as _high_depth_to_uint8
            out = ((means + 128) // 257).astype(np.uint8)
        else:
            out = _minmax_to_uint8(means, float(lo), float(hi))
    else:
        out = np.clip(np.rint(means), 0, 255).astype(np.uint8)
    return out[..., 0] if out.shape[-1] == 1 else out


def _png_inflate(f, n_bytes: int, palette: np.ndarray):
    """Inflate the IDAT stream of the PNG open at ``f`` (just after IHDR) in pieces of
    ``n_bytes`` (the last may be shorter); fills ``palette`` from PLTE on the way."""
    inflater = zlib.decompressobj()
    pending = bytearray()
    seen_idat = False
    while True:
        header = f.read(8)
        if len(header) < 8:
            break  # truncated file: the caller counts the rows it got
        length, kind = struct.unpack(">I4s", header)
        if kind != b"IDAT":
            if seen_idat or kind == b"IEND":
                break
            data = f.read(length)
            if kind == b"PLTE":
                colours = np.frombuffer(data[: len(data) // 3 * 3], np.uint8).reshape(-1, 3)
                palette[: len(colours)] = colours[:256]
            f.read(4)
            continue
        seen_idat = True
        left = length
        while left:
            piece = f.read(min(left, 2**20))
            if not piece:
                break
            left -= len(piece)
            while piece:
                pending += inflater.decompress(piece, n_bytes)
                piece = inflater.unconsumed_tail
                while len(pending) >= n_bytes:
                    yield bytes(pending[:n_bytes])
                    del pending[:n_bytes]
        if left:
            break
        f.read(4)  # CRC (Pillow's check_image verifies it)
    pending += inflater.flush()
    while pending:
        yield bytes(pending[:n_bytes])
        del pending[:n_bytes]


def _png_unfilter(rows: bytes, width: int, height: int, ctype: int) -> np.ndarray:
    """Raw 8-bit samples of PNG scan lines ``rows`` (each: filter byte + data): they are
    wrapped into a minimal PNG of colour type ``ctype`` and decoded by Pillow."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, ctype, 0, 0, 0)
    idat = zlib.compress(b"\0" + rows, 0)  # stored, not compressed: it is decoded at once
    png = _PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    with Image.open(io.BytesIO(png)) as im:
        im.load()
        return np.asarray(im)


def _describe(exc: BaseException, path: Path, size: int | None = None) -> str:
    """Turn a decoder exception into a short one-line reason."""
    text = " ".join(str(exc).split())
    if size is None:
        size = path.stat().st_size if path.exists() else 0
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


def _pil_to_array(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> uint8 gray ``(H, W)`` or RGB ``(H, W, 3)``; alpha is dropped."""
    mode = im.mode
    if mode == "L":
        return np.asarray(im)
    if mode == "RGB":
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


def _decode_dicom(path: Path) -> np.ndarray:
    """DICOM -> uint8 gray (or RGB for colour DICOMs); see the module docstring."""
    import pydicom  # imported lazily: only DICOM users pay for it
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        # .dcm without the 128-byte preamble + "DICM": try a raw dataset; a non-DICOM
        # file that merely has the extension fails below with "no pixel data".
        ds = pydicom.dcmread(path, force=True)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(path, "DICOM file has no pixel data")
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    arr = pixel_array(ds, index=0) if n_frames > 1 else ds.pixel_array

    if int(ds.get("SamplesPerPixel", 1)) > 1:  # colour (already converted to RGB)
        return arr if arr.dtype == np.uint8 else _minmax_to_uint8(arr)

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


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """Gray ``(H, W)`` -> ``(H, W, 3)``; contiguous uint8 either way."""
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr, dtype=np.uint8)
