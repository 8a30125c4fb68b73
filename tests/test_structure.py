"""The package's shape, checked from its source with ``ast``: the import graph of
``lora_lightning/`` has no cycle, packages import only what their layer allows (core →
layers, checkpoint, io → the Lightning side → the app), the core is free of Lightning and
Hydra, deliberate errors are ``LoRAError`` subclasses, and each shared idea (loading a
pickle, writing a file atomically) lives in one module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lora_lightning"
# The Lightning side (and the Hydra app on top of it); everything else is the core.
LIGHTNING_SIDE = ("lightning", "train", "app", "examples", "serve")
# What each part of the package may import from the package (by first name component).
# The core's top-level modules (config, errors, plan, inject, merge, adapters, registry,
# combine, optim, params, summary) sit on ``layers``; ``checkpoint`` and ``io`` sit on them.
TOP_LEVEL = "<top-level core module>"
ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "layers": {"errors", "config", "layers"},
    TOP_LEVEL: {"errors", "config", "layers", TOP_LEVEL},
    "checkpoint": {"errors", "config", "layers", TOP_LEVEL, "checkpoint"},
    "io": {"errors", "config", "layers", TOP_LEVEL, "checkpoint", "io"},
    "lightning": {"errors", "config", "layers", TOP_LEVEL, "checkpoint", "io", "lightning"},
}
BUILTIN_ERRORS = {"ValueError", "RuntimeError", "TypeError", "KeyError", "IndexError",
                  "Exception", "AssertionError"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()
CORE = sorted(n for n in MODULES if n != "lora_lightning"
              and n.split(".")[1] not in LIGHTNING_SIDE)


def _part(module: str) -> str:
    """Which part of the package a module belongs to (see ALLOWED)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    sub = parts[1]
    return sub if (PACKAGE / sub).is_dir() or sub in LIGHTNING_SIDE else (
        sub if sub in ("errors", "config") else TOP_LEVEL)


def _imports(name: str, path: Path) -> set[str]:
    """Modules of this package that ``name`` imports at module level or in functions."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    skip = _type_checking_only(path)  # not imported at run time
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            candidates = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in MODULES and c != name}
    return found


def _type_checking_only(path: Path) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks (not imported at run time)."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def test_the_import_graph_has_no_cycle():
    graph = {n: _imports(n, p) for n, p in MODULES.items()}
    # A package's __init__ importing its own submodules is not a cycle between modules.
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")
                       and not (MODULES[name].name == "__init__.py" and m.startswith(name + "."))}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("name", CORE)
def test_core_modules_never_import_lightning_or_hydra(name):
    path = MODULES[name]
    skip = _type_checking_only(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import | ast.ImportFrom) and node.lineno not in skip:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                node.module or ""]
            if isinstance(node, ast.ImportFrom) and node.level:
                continue  # relative: checked by the package rules below
            for mod in names:
                assert not mod.startswith(("lightning", "pytorch_lightning", "hydra")), (
                    f"{path.name}:{node.lineno} imports {mod}")


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _part(n) in ALLOWED))
def test_each_package_imports_only_what_its_layer_allows(name):
    allowed = ALLOWED[_part(name)]
    imported = _imports(name, MODULES[name])
    bad = sorted(m for m in imported if _part(m) != "package" and _part(m) not in allowed)
    assert not bad, f"{name} ({_part(name)}) imports {bad}; it may import {sorted(allowed)}"


@pytest.mark.parametrize("name", CORE)
def test_deliberate_errors_in_the_core_are_lora_errors(name):
    """``raise ValueError(...)`` and friends in the core: each must be a LoRAError subclass
    (which may also be a ValueError) from ``errors.py``, carrying its fields."""
    bare = []
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            func = node.exc.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if called in BUILTIN_ERRORS:
                bare.append(f"{name}:{node.lineno} raises {called}")
    assert not bare, bare


def test_the_package_rules_see_every_part():
    parts = {_part(n) for n in MODULES}
    assert {"layers", "checkpoint", "io", "lightning", TOP_LEVEL} <= parts
    assert _part("lora_lightning.plan") == TOP_LEVEL
    assert _part("lora_lightning.layers.base") == "layers"


def _calls(attr_chain: str) -> list[str]:
    """``module:line`` of every call to ``attr_chain`` (e.g. ``torch.load``)."""
    out = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == attr_chain:
                out.append(f"{name}:{node.lineno}")
    return out


@pytest.mark.parametrize(("call", "home"), [
    ("torch.load", "lora_lightning.io.safe_load"),
    ("os.replace", "lora_lightning.io.atomic"),
    ("os.fsync", "lora_lightning.io.atomic"),
])
def test_one_idea_lives_in_one_module(call, home):
    sites = _calls(call)
    assert sites and all(s.startswith(home + ":") for s in sites), sites
