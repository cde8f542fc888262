"""One atomic write (``pneumo_utils.files.atomic_path``) for every file pneumo writes: a failed
write leaves the target as it was and no temporary file, a finished one has the permissions
``open`` would give, and the writers that take a path (model save, calibrated copy, shards)
go through it."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pneumo_utils import files


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=["022", "077", "002"])
def umask(request) -> int:
    """The process umask set to the parameter for the test, restored after."""
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("error", [RuntimeError("writer failed"), KeyboardInterrupt(),
                                   OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))],
                         ids=["error", "ctrl-c", "disk-full"])
def test_failure_inside_the_block_leaves_no_file(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "out" / "model.keras"
    with pytest.raises(type(error)), files.atomic_path(target, suffix=".keras") as tmp:
        tmp.write_bytes(b"PK\3\4 half a zip")
        assert tmp.parent == target.parent and tmp.name.endswith(".keras")
        raise error
    assert list(target.parent.iterdir()) == []


def test_existing_target_survives_a_failed_write(tmp_path: Path) -> None:
    target = tmp_path / "index.html"
    files.write_text_atomic(target, "complete old page")
    with pytest.raises(ValueError), files.atomic_path(target) as tmp:
        tmp.write_text("half a new")
        raise ValueError("renderer failed")
    assert target.read_text() == "complete old page"
    assert [p.name for p in tmp_path.iterdir()] == ["index.html"]


def test_oserror_without_a_file_name_is_given_the_target(tmp_path: Path) -> None:
    target = tmp_path / "shard.tfrecord"
    with pytest.raises(OSError) as caught, files.atomic_path(target):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() on a full disk
    assert caught.value.filename == str(target)
    with pytest.raises(OSError, match=r"^No space left on device$"), files.atomic_path(target):
        raise OSError("No space left on device")  # a message alone stays as it was
    assert list(tmp_path.iterdir()) == []


def test_permissions_follow_the_umask(tmp_path: Path, umask: int) -> None:
    with files.atomic_path(tmp_path / "a.bin") as tmp:
        tmp.write_bytes(b"x")
        assert mode_of(tmp) == 0o600  # a private temporary until it is complete
    files.write_bytes_atomic(tmp_path / "b.bin", b"y")
    for name in ("a.bin", "b.bin"):
        assert mode_of(tmp_path / name) == 0o666 & ~umask
    files.write_bytes_atomic(tmp_path / "c.bin", b"z", mode=0o640)
    assert mode_of(tmp_path / "c.bin") == 0o640


def test_replaces_the_target_with_what_the_block_wrote(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    files.write_json_atomic(target, {"version": 1})
    with files.atomic_path(target, suffix=".partial") as tmp:
        assert tmp.read_bytes() == b""  # a new file, not the target
        tmp.write_text(json.dumps({"version": 2}))
    assert json.loads(target.read_text()) == {"version": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_temporary_of_a_killed_save_is_found_by_the_next_save(tmp_path: Path) -> None:
    """A process killed inside the block leaves ``.STEM.PID.*.keras``; the model saver's
    clean-up recognises it once that process is gone, and only then."""
    from pneumo_utils.model import saving

    target = tmp_path / "tiny.keras"
    code = ("import os, sys; from pneumo_utils.files import atomic_path\n"
            "with atomic_path(sys.argv[1], suffix='.keras') as tmp:\n"
            "    tmp.write_bytes(b'PK half'); print(tmp.name, flush=True); os._exit(0)\n")
    done = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, check=True)
    left = tmp_path / done.stdout.strip()
    assert left.is_file() and re.fullmatch(r"\.tiny\.\d+\.\w+\.keras", left.name)
    with files.atomic_path(target, suffix=".keras") as running:
        saving._remove_stale_temporaries(target)
        assert running.exists()  # this process is alive: its temporary stays
        running.write_bytes(b"model")
    assert not left.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.keras"]


@pytest.mark.parametrize("umask", [0o027], ids=["027"], indirect=True)
def test_saved_model_records_the_digest_of_the_file_in_place(tmp_path: Path, umask: int) -> None:
    import keras

    from pneumo_utils.model import saving

    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(
        keras.layers.GlobalAveragePooling2D()(inputs)))
    path = saving.save_model(model, tmp_path / "m.keras")
    sidecar = json.loads(saving.sidecar_path(path).read_text())
    assert sidecar["sha256"]["keras"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert mode_of(path) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.keras"]


@pytest.mark.parametrize("umask", [0o027], ids=["027"], indirect=True)
def test_calibrated_copy_is_whole_or_absent(tmp_path: Path, umask: int) -> None:
    from pneumo_utils.evaluation import calibrate

    source = tmp_path / "model.keras"
    source.write_bytes(os.urandom(3000))
    target = tmp_path / "site" / "model_site.keras"
    calibrate._copy_atomic(source, target)
    assert target.read_bytes() == source.read_bytes() and mode_of(target) == 0o666 & ~umask
    with pytest.raises(FileNotFoundError):
        calibrate._copy_atomic(tmp_path / "missing.keras", target)
    assert target.read_bytes() == source.read_bytes()
    assert [p.name for p in target.parent.iterdir()] == ["model_site.keras"]


@pytest.mark.parametrize("umask", [0o027], ids=["027"], indirect=True)
def test_shard_entry_describes_the_file_in_place(tmp_path: Path, umask: int) -> None:
    tf = pytest.importorskip("tensorflow")
    from pneumo_utils.scale import shard_writer

    path = tmp_path / "train-00000-of-00001.tfrecord"
    entry = shard_writer._write_shard(tf, path, (bytes([i]) * 100 for i in range(5)), "train", 0, 5)
    assert entry["images"] == 5 and entry["bytes"] == path.stat().st_size
    assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert mode_of(path) == 0o666 & ~umask

    def broken():
        yield b"one record"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        shard_writer._write_shard(tf, tmp_path / "train-00001-of-00002.tfrecord", broken(), "train", 5, 6)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
