"""Atomic file writes: the one way this package writes a file.

Each new file is written to a hidden temporary beside its target (same directory, so the
same filesystem), flushed to disk with ``fsync`` and only then renamed over the target
with ``os.replace``. A crash, a kill or a full disk mid-write leaves the previous file
intact and no temporary behind. Several files (an adapter's weights and config) are all
staged before any is renamed, so a failure leaves the old set complete.

Write errors are ``OSError`` naming the target file and saying what was kept.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

Writer = Callable[[Path], object]
"""Writes the new content to the path it is given."""


def partial_name(target: Path) -> Path:
    """The temporary that a write of ``target`` by this process uses."""
    return target.with_name(f".{target.name}.{os.getpid()}.partial")


def _write_error(target: Path, err: BaseException, kept: str) -> OSError:
    if isinstance(err, OSError) and err.errno is not None:
        return OSError(err.errno, f"{err.strerror}; {kept}", str(target))
    return OSError(f"{target}: could not be written ({type(err).__name__}: {err}); {kept}.")


def _stage(target: Path, write: Writer, kept: str) -> Path:
    tmp = partial_name(target)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        # safetensors reports I/O failures as its own SafetensorError, without the file name
        ours = isinstance(err, OSError) and err.filename in (None, str(tmp), tmp)
        if ours or type(err).__name__ == "SafetensorError":
            raise _write_error(target, err, kept) from err
        raise
    return tmp


def write_files(files: Sequence[tuple[str | os.PathLike, Writer]], kept: str) -> None:
    """Write each ``(target, writer)`` atomically, all staged before any is renamed.

    ``kept`` says, in an error, what is left as it was (``"the previous file is
    unchanged"``). Stale temporaries that a killed earlier write of the same targets left
    behind (another process id) are removed after a successful write.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for target, write in files:
            target = Path(target)
            staged.append((_stage(target, write, kept), target))
        for tmp, target in staged:
            os.replace(tmp, target)
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    for _, target in staged:
        remove_stale_partials(target)


def write_file(target: str | os.PathLike, write: Writer, kept: str) -> None:
    """Write one file atomically (see :func:`write_files`)."""
    write_files([(target, write)], kept)


def remove_stale_partials(target: Path) -> None:
    """Remove the temporaries of ``target`` left by writes that were killed midway."""
    prefix, suffix = f".{target.name}.", ".partial"
    for stale in target.parent.iterdir() if target.parent.is_dir() else ():
        name = stale.name
        if name.startswith(prefix) and name.endswith(suffix) and name[len(prefix):-len(suffix)
                                                                      ].isdigit():
            with contextlib.suppress(OSError):
                stale.unlink()
