"""atomic_write / atomic_dir clean only the temporary files of killed writes: another live process
writing the same path keeps its own."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from kdcompress.io import STALE_SECONDS, atomic_dir, atomic_write


@pytest.fixture
def pids():
    """(a live process's pid, a finished one's)."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    yield live.pid, dead.pid
    live.kill()
    live.wait()


def temps(folder, name: str, pids: tuple[int, int]) -> dict:
    host = socket.gethostname()
    return {"live": folder / f".{name}.{host}-{pids[0]}.abc123.tmp",
            "dead": folder / f".{name}.{host}-{pids[1]}.abc123.tmp",
            "other host": folder / f".{name}.elsewhere-{pids[1]}.abc123.tmp",
            "other host, old": folder / f".{name}.elsewhere-{pids[0]}.old456.tmp",
            "no writer named": folder / f".{name}.k1ll3d.tmp"}


STAYS = {"live": True, "dead": False, "other host": True, "other host, old": False, "no writer named": False}


def age(path) -> None:
    old = time.time() - STALE_SECONDS - 60
    os.utime(path, (old, old))


def test_atomic_write_keeps_a_live_writers_temp_file_and_removes_a_killed_ones(tmp_path, pids):
    made = temps(tmp_path, "model.pt", pids)
    for path in made.values():
        path.write_bytes(b"half")
    age(made["other host, old"])
    atomic_write(tmp_path / "model.pt", b"whole")
    assert {what: path.exists() for what, path in made.items()} == STAYS
    assert (tmp_path / "model.pt").read_bytes() == b"whole"
    ours = [p for p in tmp_path.glob(".model.pt.*.tmp") if p not in made.values()]
    assert not ours  # its own temporary file became model.pt


def test_atomic_dir_keeps_a_live_writers_temp_folder_and_removes_a_killed_ones(tmp_path, pids):
    made = temps(tmp_path, "bundle", pids)
    for path in made.values():
        path.mkdir()
        (path / "part").write_text("half")
    age(made["other host, old"])
    with atomic_dir(tmp_path / "bundle") as out:
        (out / "model.onnx").write_text("whole")
    assert {what: path.exists() for what, path in made.items()} == STAYS
    assert (tmp_path / "bundle" / "model.onnx").read_text() == "whole"
