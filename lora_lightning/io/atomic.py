"""Atomic file writes: the one way this package writes a file.

Each new file is written to a hidden temporary beside its target (same directory, so the
same filesystem), flushed to disk with ``fsync`` and only then renamed over the target
with ``os.replace``. A crash, a kill or a full disk mid-write leaves the previous file
intact. Several files (an adapter's weights and config) are all staged before any is
renamed, so a failure leaves the old set complete.

The temporary is ``.<target name>.<pid>.<random token>.partial``: unguessable, and created
by this module with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (mode 0600 while it is written), so a
symlink or file planted in the directory is never followed or reused. After the writer
has run, the temporary must still be a regular file of this user with one link, opened
without following symlinks, or nothing is renamed. The new file gets the target's permission bits when the target
exists, else the default for a new file (0666 less the umask).

Writers are independent: each process (and thread) stages its own temporary, the last
rename wins, and nobody removes another writer's temporary. After a successful write,
the temporaries of the same target that killed writes left behind are removed by the
rule of :func:`is_stale`.

Write errors are ``OSError`` naming the target file and saying what was kept.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

Writer = Callable[[Path], object]
"""Writes the new content to the path it is given."""

STALE_DEAD_SECONDS = 60.0
"""A temporary whose writer's process is gone (on this machine) is stale once it has not
been modified for this long (the grace covers a writer on another machine sharing the
directory, whose process id means nothing here)."""
STALE_SECONDS = 3600.0
"""Any temporary not modified for this long is stale, whoever wrote it."""

_SUFFIX = ".partial"
_live: set[str] = set()  # temporaries this process is writing now (all threads)
_live_lock = threading.Lock()


def _new_file_mode() -> int:
    """0666 less the process umask (read without ever loosening it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o077)  # briefly stricter, never looser, for other threads
    os.umask(old)
    return 0o666 & ~old


def _target_mode(target: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return _new_file_mode()


def _create_temp(target: Path) -> tuple[Path, int]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    for _ in range(16):
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(8)}{_SUFFIX}")
        try:
            return tmp, os.open(tmp, flags, 0o600)
        except FileExistsError:
            continue
    raise FileExistsError(f"{target}: could not create a unique temporary beside it")


def _write_error(target: Path, err: BaseException, kept: str) -> OSError:
    if isinstance(err, OSError) and err.errno is not None:
        return OSError(err.errno, f"{err.strerror}; {kept}", str(target))
    return OSError(f"{target}: could not be written ({type(err).__name__}: {err}); {kept}.")


def _stage(target: Path, write: Writer, kept: str) -> Path:
    mode = _target_mode(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)  # as the writers did themselves
        tmp, fd = _create_temp(target)
    except OSError as err:
        raise _write_error(target, err, kept) from err
    with _live_lock:
        _live.add(str(tmp))
    os.close(fd)  # the writer opens the path itself (some replace the file: fsspec)
    try:
        write(tmp)
        _seal(tmp, mode)
    except BaseException as err:
        _forget(tmp)
        # safetensors reports I/O failures as its own SafetensorError, without the file name
        ours = isinstance(err, OSError) and err.filename in (None, str(tmp), tmp)
        if ours or type(err).__name__ == "SafetensorError":
            raise _write_error(target, err, kept) from err
        raise
    return tmp


def _seal(tmp: Path, mode: int) -> None:
    """Check that ``tmp`` is still a plain file of ours, give it ``mode`` and fsync it."""
    fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
            raise OSError(f"the temporary {tmp.name} was replaced by something else while it "
                          "was written (by another process in this directory?); nothing was "
                          "renamed")
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)


def _forget(tmp: Path) -> None:
    """Remove our temporary (if it is still the file we made) and stop tracking it."""
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)
    with _live_lock:
        _live.discard(str(tmp))


def write_files(files: Sequence[tuple[str | os.PathLike, Writer]], kept: str) -> None:
    """Write each ``(target, writer)`` atomically, all staged before any is renamed.

    ``kept`` says, in an error, what is left as it was (``"the previous file is
    unchanged"``). Stale temporaries of the same targets (see :func:`is_stale`) are
    removed after a successful write.
    """
    for target, _ in files:
        # os.replace cannot put a file over a directory; finding out only at the rename
        # would leave the targets renamed before it replaced, so refuse before any change.
        if Path(target).is_dir() and not Path(target).is_symlink():
            raise _write_error(Path(target), IsADirectoryError(
                errno.EISDIR, "a directory is in the way of the file"), kept)
    staged: list[tuple[Path, Path]] = []
    renamed: list[Path] = []
    try:
        for target, write in files:
            target = Path(target)
            staged.append((_stage(target, write, kept), target))
        for tmp, target in staged:
            try:
                os.replace(tmp, target)
            except OSError as err:
                also = (f"; already replaced: {[str(p) for p in renamed]}" if renamed else "")
                raise _write_error(target, err, kept + also) from err
            renamed.append(target)
    finally:
        for tmp, _ in staged:
            _forget(tmp)
    for _, target in staged:
        remove_stale_partials(target)


def write_file(target: str | os.PathLike, write: Writer, kept: str) -> None:
    """Write one file atomically (see :func:`write_files`)."""
    write_files([(target, write)], kept)


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process on this machine (a thread id does not count)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1]) == pid
    except (OSError, ValueError):
        pass
    return True


def _writer_pid(target: Path, name: str) -> int | None:
    """The process id in a temporary's name for ``target``, or None if it is not one."""
    prefix = f".{target.name}."
    if not (name.startswith(prefix) and name.endswith(_SUFFIX)):
        return None
    parts = name[len(prefix):-len(_SUFFIX)].split(".")
    if len(parts) == 1 and parts[0].isdigit():  # the name before random tokens
        return int(parts[0])
    if len(parts) == 2 and parts[0].isdigit() and len(parts[1]) == 16:
        return int(parts[0])
    return None


def is_stale(path: Path, pid: int, now: float | None = None) -> bool:
    """The rule for removing another write's temporary ``path`` (written by ``pid``).

    Never one that this process is writing now. Otherwise stale when it has not been
    modified for :data:`STALE_SECONDS`, or when its writer is not a live process on this
    machine and it has not been modified for :data:`STALE_DEAD_SECONDS`.
    """
    with _live_lock:
        if str(path) in _live:
            return False
    try:
        age = (time.time() if now is None else now) - os.lstat(path).st_mtime
    except OSError:
        return False
    if age >= STALE_SECONDS:
        return True
    if pid == os.getpid():
        return age >= STALE_DEAD_SECONDS  # ours, but no thread is writing it
    return age >= STALE_DEAD_SECONDS and not _pid_alive(pid)


def remove_stale_partials(target: Path) -> None:
    """Remove the temporaries of ``target`` that killed writes left (see :func:`is_stale`).

    Temporaries named by the earlier scheme (``.<name>.<pid>.partial``, no token) are
    removed at once: no writer of this version makes them.
    """
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return
    for path in entries:
        pid = _writer_pid(target, path.name)
        if pid is None:
            continue
        legacy = path.name == f".{target.name}.{pid}{_SUFFIX}"
        if legacy or is_stale(path, pid):
            with contextlib.suppress(OSError):
                path.unlink()
