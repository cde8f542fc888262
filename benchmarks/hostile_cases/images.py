"""Images every decoder must agree on: a PNG with an unknown critical chunk, a JPEG damaged in
place after its verdict was cached, and small PNGs of many pixels.

``evaluate`` needs a saved model: each case builds a tiny Keras CNN (32 px) and saves it with
the ``save_model`` of the checkout under test, in its own process, so the same inputs work for
a before/after table (the checkout is read from ``--checkout`` on the benchmark's command line).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import hostile_inputs
import numpy as np
from hostile_inputs import ROOT, Case
from PIL import Image

_MODEL = """
import sys, keras
from pneumo_utils.model.saving import save_model
inputs = keras.Input((32, 32, 3))
x = keras.layers.Rescaling(1 / 255)(inputs)
x = keras.layers.Conv2D(4, 3, activation="relu")(x)
x = keras.layers.GlobalAveragePooling2D()(x)
outputs = keras.layers.Dense(1, activation="sigmoid")(x)
save_model(keras.Model(inputs, outputs, name="tiny"), sys.argv[1])
"""


def _checkout() -> Path:
    """The checkout whose code the benchmark runs (``--checkout``, else this one)."""
    argv = sys.argv
    return Path(argv[argv.index("--checkout") + 1]).resolve() if "--checkout" in argv else ROOT


def _python(args: list[str], cwd: Path) -> None:
    """Run ``python ARGS`` with the checkout under test, quietly; raise if it fails."""
    env = dict(os.environ, PYTHONPATH=str(_checkout()), TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run([sys.executable, *args], cwd=cwd, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _model(folder: Path) -> Path:
    path = folder / "tiny.keras"
    _python(["-c", _MODEL, str(path)], cwd=folder)
    return path


def _picture(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, size)[:, None] + np.linspace(0, 40, size)[None, :]
    return np.clip(ramp + rng.normal(0, 8, (size, size)), 0, 255).astype(np.uint8)


def _folder(folder: Path, suffix: str, n: int = 4, size: int = 128) -> Path:
    """``data/{NORMAL,PNEUMONIA}`` with ``n`` gray images each."""
    data = folder / "data"
    for label in ("NORMAL", "PNEUMONIA"):
        (data / label).mkdir(parents=True)
        for k in range(n):
            Image.fromarray(_picture(size, seed=k + 10 * len(label))).save(data / label / f"{k}{suffix}")
    return data


def _add_critical_chunk(path: Path) -> None:
    """Insert an unknown critical chunk ``QBAD`` (valid CRC) after ``IHDR``."""
    png = path.read_bytes()
    body = b"\x00" * 4
    chunk = struct.pack(">I", len(body)) + b"QBAD" + body + struct.pack(">I", zlib.crc32(b"QBAD" + body))
    path.write_bytes(png[:33] + chunk + png[33:])


def _critical_chunk_evaluate(folder: Path) -> list[str]:
    data = _folder(folder, ".png")
    _add_critical_chunk(data / "PNEUMONIA" / "0.png")
    return [*hostile_inputs.command("evaluate"), "--model", str(_model(folder)), "--data", str(data),
            "--n-boot", "10"]


def _critical_chunk_predict(folder: Path) -> list[str]:
    data = _folder(folder, ".png")
    _add_critical_chunk(data / "PNEUMONIA" / "0.png")
    return [*hostile_inputs.command("predict"), "--model", str(_model(folder)), str(data / "PNEUMONIA")]


def _damaged_in_place(folder: Path) -> list[str]:
    """A first ``evaluate`` fills the verdict cache; then 300 bytes of one JPEG are zeroed
    with its size and modification time kept."""
    data = _folder(folder, ".jpeg", size=256)
    argv = [*hostile_inputs.command("evaluate"), "--model", str(_model(folder)), "--data", str(data),
            "--n-boot", "10"]
    _python(argv, cwd=folder)
    victim = data / "PNEUMONIA" / "0.jpeg"
    info = victim.stat()
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 300] = bytes(300)
    victim.write_bytes(bytes(raw))
    os.utime(victim, ns=(info.st_atime_ns, info.st_mtime_ns))
    return argv


def _large_pngs(n: int, batch_size: int | None = None):
    """``n`` RGB 6000 x 6000 PNGs (flat colour, about 100 KB each), half per class."""
    def build(folder: Path) -> list[str]:
        data = folder / "data"
        for k in range(n):
            label = ("NORMAL", "PNEUMONIA")[k % 2]
            (data / label).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (6000, 6000), (40 + k, 90, 140)).save(data / label / f"{k}.png")
        argv = [*hostile_inputs.command("evaluate"), "--model", str(_model(folder)), "--data", str(data),
                "--n-boot", "10"]
        return argv + (["--batch-size", str(batch_size)] if batch_size else [])
    return build


def _large_pngs_predict(folder: Path) -> list[str]:
    argv = _large_pngs(8)(folder)
    return [*hostile_inputs.command("predict"), "--model", argv[3], "--no-input-check", argv[5]]


CASES = [
    Case("images", "PNG with unknown critical chunk: evaluate", _critical_chunk_evaluate),
    Case("images", "PNG with unknown critical chunk: predict", _critical_chunk_predict),
    Case("images", "JPEG damaged in place, size and mtime kept: evaluate", _damaged_in_place),
    Case("images", "8 RGB 6000 x 6000 PNGs: evaluate", _large_pngs(8)),
    Case("images", "24 RGB 6000 x 6000 PNGs: evaluate", _large_pngs(24)),
    Case("images", "8 RGB 6000 x 6000 PNGs: evaluate --batch-size 4", _large_pngs(8, 4)),
    Case("images", "8 RGB 6000 x 6000 PNGs: predict", _large_pngs_predict),
]
