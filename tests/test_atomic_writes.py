"""The atomic writer (issue 18, item 9): a planted symlink is never followed, the target's
permission bits are kept, concurrent writers never remove each other's temporaries (the
last rename wins and every message is true), and only stale temporaries are cleaned up."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lora_lightning.io import atomic
from lora_lightning.io.atomic import (
    STALE_DEAD_SECONDS,
    STALE_SECONDS,
    is_stale,
    remove_stale_partials,
    write_file,
)

ROOT = Path(__file__).resolve().parents[1]
KEPT = "the previous file is unchanged"


def _writes(data: bytes):
    return lambda p: Path(p).write_bytes(data)


def _temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".partial"))


def test_a_symlink_planted_at_the_old_guessable_name_is_not_followed(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    target = ckpts / "last.ckpt"
    (ckpts / f".last.ckpt.{os.getpid()}.partial").symlink_to(outside)
    write_file(target, _writes(b"new checkpoint"), KEPT)
    assert outside.read_bytes() == b"precious"
    assert not target.is_symlink() and target.read_bytes() == b"new checkpoint"


def test_a_temporary_swapped_for_a_symlink_while_written_is_not_renamed(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"old")

    def swap(p):  # what an attacker racing the writer would do
        Path(p).write_bytes(b"new")
        os.unlink(p)
        os.symlink(outside, p)

    with pytest.raises(OSError, match="last.ckpt") as err:
        write_file(target, swap, KEPT)
    assert KEPT in str(err.value)
    assert target.read_bytes() == b"old" and not target.is_symlink()
    assert outside.read_bytes() == b"precious"
    assert _temps(tmp_path) == []


def test_the_temporary_name_is_unguessable_and_made_exclusively(tmp_path, monkeypatch):
    seen = []
    write_file(tmp_path / "a.bin", lambda p: (seen.append(Path(p).name), Path(p).write_bytes(b"x")),
               KEPT)
    write_file(tmp_path / "a.bin", lambda p: (seen.append(Path(p).name), Path(p).write_bytes(b"y")),
               KEPT)
    assert seen[0] != seen[1]
    assert all(n.startswith(f".a.bin.{os.getpid()}.") and n.endswith(".partial") for n in seen)


def test_the_target_mode_is_kept(tmp_path):
    target = tmp_path / "secret.ckpt"
    target.write_bytes(b"old")
    target.chmod(0o600)
    write_file(target, _writes(b"new"), KEPT)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    target.chmod(0o640)
    write_file(target, _writes(b"newer"), KEPT)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_a_new_file_gets_the_umask_default(tmp_path):
    old = os.umask(0o027)
    try:
        write_file(tmp_path / "new.ckpt", _writes(b"x"), KEPT)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.ckpt").stat().st_mode) == 0o640


_CHILD = """
import sys, time
from pathlib import Path
from lora_lightning.io.atomic import write_file
target, ready, go = map(Path, sys.argv[1:4])
def slow(p):
    Path(p).write_bytes(b"child")
    ready.write_text("x")
    while not go.exists():
        time.sleep(0.01)
write_file(target, slow, "the previous file is unchanged")
"""


def test_two_processes_writing_one_target_both_succeed_and_the_last_wins(tmp_path):
    target, ready, go = tmp_path / "last.ckpt", tmp_path / "ready", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(target), str(ready), str(go)],
                             env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert child.poll() is None, child.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # the child is mid-write: our complete write (and its cleanup) must leave its temp
        write_file(target, _writes(b"parent"), KEPT)
        assert target.read_bytes() == b"parent"
        assert len(_temps(tmp_path)) == 1  # the child's, still being written
    finally:
        go.write_text("x")
        _, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert target.read_bytes() == b"child"  # renamed last
    assert _temps(tmp_path) == []


def test_threads_writing_one_target_each_use_their_own_temporary(tmp_path):
    target = tmp_path / "last.ckpt"
    barrier, errors = threading.Barrier(4), []

    def writer(i):
        def slow(p):
            Path(p).write_bytes(str(i).encode() * 1000)
            barrier.wait(timeout=30)  # all four are mid-write at once
        try:
            write_file(target, slow, KEPT)
        except BaseException as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert target.read_bytes() in {str(i).encode() * 1000 for i in range(4)}
    assert _temps(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _temp(directory: Path, pid: int, age: float, token: str = "0123456789abcdef") -> Path:
    path = directory / f".last.ckpt.{pid}.{token}.partial"
    path.write_bytes(b"half")
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_cleanup_removes_only_stale_temporaries(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    fresh_dead = _temp(tmp_path, dead, 1, "a" * 16)
    old_dead = _temp(tmp_path, dead, STALE_DEAD_SECONDS + 5, "b" * 16)
    fresh_alive = _temp(tmp_path, alive, STALE_DEAD_SECONDS + 5, "c" * 16)
    ancient_alive = _temp(tmp_path, alive, STALE_SECONDS + 5, "d" * 16)
    legacy = tmp_path / f".last.ckpt.{dead}.partial"
    legacy.write_bytes(b"left by the earlier naming")
    other = _temp(tmp_path, dead, STALE_SECONDS + 5, "e" * 16).rename(
        tmp_path / f".other.ckpt.{dead}.{'e' * 16}.partial")
    remove_stale_partials(tmp_path / "last.ckpt")
    assert fresh_dead.exists()  # its writer may be on another machine: a grace period
    assert not old_dead.exists()
    assert fresh_alive.exists()  # a live writer's temporary is never removed
    assert not ancient_alive.exists()  # untouched for an hour: stale whoever wrote it
    assert not legacy.exists()
    assert other.exists()  # another target's temporaries are not ours to judge


def test_cleanup_never_removes_a_temporary_this_process_is_writing(tmp_path):
    target = tmp_path / "last.ckpt"
    seen = []

    def slow(p):
        Path(p).write_bytes(b"x")
        old = time.time() - STALE_SECONDS - 5
        os.utime(p, (old, old))  # however old it looks
        seen.append(Path(p))
        remove_stale_partials(target)
        assert Path(p).exists()

    write_file(target, slow, KEPT)
    assert target.read_bytes() == b"x"
    assert is_stale(seen[0], os.getpid()) is False  # gone now, so not judged stale
    assert atomic._live == set()
