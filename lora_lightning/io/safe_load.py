"""Reading ``torch.save`` files safely: the one place this package calls ``torch.load``.

A pickle can run any code while it is loaded, and adapters and checkpoints are meant to be
shared. So every load is ``torch.load(weights_only=True)``, which builds only tensors and
plain data, and before that the file's pickled globals are listed without unpickling
anything (``torch.serialization.get_unsafe_globals_in_checkpoint``): a file that names a
global outside :data:`SAFE_GLOBALS` is refused with :class:`UnsafeFileError`, naming the
globals, before a byte of it is unpickled.

:data:`SAFE_GLOBALS` holds exactly what Lightning writes for hyperparameters that a Hydra
app passes as OmegaConf containers (plus ``pathlib`` paths); none of them runs code when
built. ``trusted=True`` is the explicit opt-in for files you made yourself or trust: they
load with ``weights_only=False``.

What a few bytes of pickle can make the loader allocate is capped too: a call of
``bytearray`` or ``bytes`` with a length above :data:`MAX_PICKLED_ALLOCATION` (a 1.4 kB
file can otherwise ask for 600 MB) is refused with :class:`FileAllocationError`, found by
reading the pickle's opcodes, before anything is unpickled.

Zip archives also get their CRC-32s checked first (``torch.load`` never checks them, so a
flipped bit in tensor data would load silently), and every failure becomes one
:class:`CheckpointReadError` naming the file.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import pickletools
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointReadError, FileAllocationError, UnsafeFileError

SAFE_GLOBALS = frozenset({
    # OmegaConf containers, as Lightning pickles the hparams a Hydra app passes
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata", "omegaconf.base.Metadata",
    "omegaconf.nodes.AnyNode", "omegaconf.nodes.StringNode", "omegaconf.nodes.IntegerNode",
    "omegaconf.nodes.FloatNode", "omegaconf.nodes.BooleanNode", "omegaconf.nodes.BytesNode",
    "omegaconf.nodes.PathNode",
    # the types and factories those containers name
    "typing.Any", "collections.defaultdict", "builtins.dict", "builtins.list",
    "builtins.tuple", "builtins.set", "builtins.int", "builtins.float", "builtins.str",
    "builtins.bool", "builtins.bytes", "builtins.object",
    # paths in hparams
    "pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePosixPath",
    "pathlib.PureWindowsPath",
})
"""Pickled globals a safe load allows beyond torch's own tensor and primitive types."""

# What torch.load raises on a damaged or foreign file (truncated zip: OSError EINVAL; empty:
# EOFError; a text file: KeyError; allow-listed callables with bad arguments, as
# set([[1]]): TypeError; deep nesting: RecursionError, a RuntimeError).
READ_ERRORS = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile,
               ValueError, zlib.error, TypeError, KeyError, IndexError, AttributeError,
               MemoryError, OverflowError)

MAX_PICKLED_ALLOCATION = 1 << 20
"""The most bytes one ``bytearray(n)`` or ``bytes(n)`` in a pickle may ask for (1 MiB).
Files this package and Lightning write never call them with a length at all."""
_AMPLIFIERS = frozenset({"builtins.bytearray", "builtins.bytes"})
_PUSH_ARG = frozenset({"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4",
                       "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8",
                       "STRING", "BINSTRING", "SHORT_BINSTRING"})


class _Global(str):
    """A global named in a pickle (as ``module.name``), on the simulated stack."""


def _oversized_calls(stream: io.BufferedIOBase, limit: int) -> list[str]:
    """Calls of ``bytearray``/``bytes`` with a length above ``limit`` in one pickle.

    Follows the pickle's opcodes on a simulated stack (globals, ints and strings are kept,
    everything else is a placeholder); nothing is built or run. A malformed pickle stops
    the scan: ``torch.load`` then reports it.
    """
    mark, stack, memo, found = object(), [], {}, []

    def pop():
        return stack.pop() if stack else None

    def pop_to_mark():
        items = []
        while stack and stack[-1] is not mark:
            items.append(stack.pop())
        pop()
        return items[::-1]

    try:
        for op, arg, _ in pickletools.genops(stream):
            name = op.name
            if name == "GLOBAL":
                stack.append(_Global(str(arg).replace(" ", ".").replace("__builtin__.",
                                                                         "builtins.")))
            elif name == "STACK_GLOBAL":
                attr, module = pop(), pop()
                stack.append(_Global(f"{module}.{attr}".replace("__builtin__.", "builtins.")))
            elif name in _PUSH_ARG:
                stack.append(arg)
            elif name == "MARK":
                stack.append(mark)
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1] if stack else None
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg))
            elif name == "DUP":
                stack.append(stack[-1] if stack else None)
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items = [pop() for _ in range(n)][::-1]
                stack.append(tuple(items))
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name == "TUPLE":
                stack.append(tuple(pop_to_mark()))
            elif name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX"):
                if name == "NEWOBJ_EX":
                    pop()
                args, func = pop(), pop()
                if (isinstance(func, _Global) and func in _AMPLIFIERS
                        and isinstance(args, tuple) and args and type(args[0]) is int
                        and args[0] > limit):
                    found.append(f"{func}({args[0]})")
                stack.append(None)
            else:
                before = op.stack_before
                if pickletools.markobject in before:
                    pop_to_mark()
                    for _ in range(before.index(pickletools.markobject)):
                        pop()
                else:
                    for _ in before:
                        pop()
                stack.extend(None for _ in op.stack_after)
    except (ValueError, EOFError, KeyError, IndexError, TypeError, UnicodeDecodeError):
        pass
    return found


def check_allocations(path: str | os.PathLike, limit: int = MAX_PICKLED_ALLOCATION) -> None:
    """Refuse a ``torch.save`` file whose pickle asks for more than ``limit`` bytes in one
    ``bytearray``/``bytes`` call (:class:`FileAllocationError`), without unpickling it."""
    found = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    if member.endswith(".pkl"):
                        with archive.open(member) as f:
                            found += _oversized_calls(io.BufferedReader(f), limit)
        else:  # the legacy format: a few pickles in a row, then raw storage bytes
            with open(path, "rb") as f:
                for _ in range(5):
                    start = f.tell()
                    found += _oversized_calls(f, limit)
                    if f.tell() == start:
                        break
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, zlib.error):
        return  # unreadable: torch.load reports it
    if found:
        raise FileAllocationError(str(path), found, limit)


def unreadable(path: str | os.PathLike, err: BaseException) -> CheckpointReadError:
    """The error for a file that ``torch.load`` could not read."""
    first = str(err).splitlines()[0] if str(err) else ""
    raised = f"torch.load raised {type(err).__name__}" + (f": {first}" if first else "")
    if zipfile.is_zipfile(path):  # a complete archive (callers check its CRCs first)
        return CheckpointReadError(f"checkpoint {str(path)!r} could not be loaded: {raised}",
                                   str(path))
    if first.startswith("Weights only load failed"):
        # its advice (load with weights_only=False) is for intact files, not damaged ones
        raised = f"torch.load raised {type(err).__name__}"
    return CheckpointReadError(
        f"checkpoint {str(path)!r} is unreadable (truncated or corrupted?): not a complete "
        f"zip archive as torch.save writes; {raised}", str(path),
    )


def verify_checkpoint_file(path: str | os.PathLike) -> None:
    """Check the CRC-32 of every member of a checkpoint's zip archive.

    Reads the whole file once (about as long as loading it). Files that are not zip
    archives are left to ``torch.load``.
    """
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as err:
        raise unreadable(path, err) from err
    if bad is not None:
        raise CheckpointReadError(
            f"checkpoint {str(path)!r} is corrupted: archive member {bad!r} fails its CRC-32 "
            "check (a damaged disk or an interrupted copy?); use an earlier checkpoint.",
            str(path),
        )


def unsafe_globals(path: str | os.PathLike) -> list[str]:
    """The globals ``path`` pickles that :data:`SAFE_GLOBALS` and torch do not allow.

    Reads the pickle's opcodes without executing any of them.
    """
    found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    return [g for g in found if g not in SAFE_GLOBALS]


def _resolve(names: list[str]) -> list[Any]:
    out = []
    for name in names:
        module, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue  # not installed here: torch refuses it if the file really needs it
    return out


def torch_load(path: str | os.PathLike, map_location: Any = "cpu", *, trusted: bool = False,
               what: str = "checkpoint") -> Any:
    """``torch.load`` ``path`` with ``weights_only=True`` (see the module docstring).

    Raises :class:`UnsafeFileError` for a file that needs more, unless ``trusted``.
    """
    if trusted:
        return torch.load(path, map_location=map_location, weights_only=False)
    check_allocations(path)
    if zipfile.is_zipfile(path):
        refused = unsafe_globals(path)
        if refused:
            raise UnsafeFileError(str(path), refused, what)
        allowed = _resolve(sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path))))
    else:
        allowed = []  # a legacy (non-zip) pickle: torch's weights-only unpickler decides
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if not zipfile.is_zipfile(path):
            raise  # a damaged or foreign file: the caller reports it as unreadable
        # An intact archive whose globals passed the check but that torch still refuses.
        raise UnsafeFileError(str(path), [_refused_in(str(err))], what) from err


def _refused_in(message: str) -> str:
    """The global torch names in its weights-only refusal (``GLOBAL x.y``), if any."""
    for line in message.splitlines():
        if "GLOBAL " in line:
            return line.split("GLOBAL ", 1)[1].split()[0]
    return "a global outside the allow-list"


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *,
                    trusted: bool = False) -> dict[str, Any]:
    """Load a checkpoint dict safely, turning every failure into one error naming the file.

    Args:
        path: the ``.ckpt`` (or any ``torch.save``) file.
        map_location: as for ``torch.load``.
        trusted: load with ``weights_only=False`` (runs whatever the file pickles). Only for
            files you made or trust.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"checkpoint {str(path)!r} does not exist or is not a file.",
                                  str(path))
    verify_checkpoint_file(path)
    try:
        data = torch_load(path, map_location, trusted=trusted)
    except CheckpointReadError:
        raise
    except READ_ERRORS as err:
        raise unreadable(path, err) from err
    if not isinstance(data, dict):
        raise CheckpointReadError(
            f"checkpoint {str(path)!r} holds a {type(data).__name__}, not a checkpoint dict.",
            str(path),
        )
    return data
