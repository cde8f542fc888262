"""DICOM files: detection, headers and pixels mapped to uint8 with bounded memory.

Modality LUT (rescale), then VOI LUT or window centre/width mapped onto 0..255; without
either, min-max. MONOCHROME1 (bright = low values) is inverted so that bone is always bright.
Multi-frame files give their first frame. Read at a reduced size, the raw values are
block-averaged before the LUTs, so the float copies stay small. A deflated data set is
inflated in counted blocks and one frame's decoded size is checked from the header, both
against :data:`MAX_DICOM_BYTES`, before pydicom holds them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pneumo_utils.data.pixels import PIXEL_BUDGET, ImageReadError, block_mean, minmax_to_uint8

DICOM_EXTENSIONS: frozenset[str] = frozenset({".dcm", ".dicom"})

MAX_DICOM_BYTES = 128 * 2**20
"""Largest DICOM data set read (128 MiB): a deflated file's inflated size, checked while
inflating in blocks, and one frame's decoded pixels (rows x columns x samples x bits
allocated), checked from the header before any pixel is decompressed. A 36 Mpx 16-bit
radiograph is 72 MB."""


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


def dicom_header(path: Path) -> tuple[int, int, str]:
    """``(columns, rows, photometric interpretation)`` without reading the pixel data."""
    ds = read_dicom(path, stop_before_pixels=True)
    return int(ds.Columns), int(ds.Rows), str(ds.get("PhotometricInterpretation", "?"))


def read_dicom(path: Path, stop_before_pixels: bool = False):
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


def decode_dicom(path: Path, target: tuple[int, int] | None) -> np.ndarray:
    """DICOM -> uint8 gray (or RGB for colour DICOMs); see the module docstring."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

    ds = read_dicom(path)
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
        return arr if arr.dtype == np.uint8 else minmax_to_uint8(arr)

    if target is not None:
        arr = block_mean(arr, min(arr.shape[1] // target[0], arr.shape[0] // target[1]))
    arr = apply_modality_lut(arr, ds)
    has_lut = bool(ds.get("VOILUTSequence"))
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    out = apply_voi_lut(arr, ds)
    if has_window and not has_lut:
        # the window maps onto the output range of the pixel data; recover that range by
        # pushing two extreme values through the same transform
        with np.errstate(over="ignore"):
            lo, hi = apply_voi_lut(np.array([-1e12, 1e12]), ds)
        gray = minmax_to_uint8(out, float(lo), float(hi))
    else:
        gray = minmax_to_uint8(out)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        gray = 255 - gray
    return gray

