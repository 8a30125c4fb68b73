"""The package's shape, checked from its source with ``ast`` (issue 9): the import graph of
``lora_lightning/`` has no cycle, core modules stay small and free of Lightning and Hydra,
and each shared idea (loading a pickle, writing a file atomically) lives in one module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lora_lightning"
# Modules that sit on Lightning (or Hydra); every other top-level module is the core.
LIGHTNING_SIDE = {"callback", "module_hooks", "checkpoint_io", "loading", "train"}
CORE_MAX_LINES = 300


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
CORE = sorted(n for n in MODULES if n.count(".") == 1 and MODULES[n].name != "__init__.py"
              and n.split(".")[1] not in LIGHTNING_SIDE)


def _imports(name: str, path: Path) -> set[str]:
    """Modules of this package that ``name`` imports at module level or in functions."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
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
def test_core_modules_are_small_and_never_import_lightning_or_hydra(name):
    path = MODULES[name]
    lines = len(path.read_text().splitlines())
    assert lines <= CORE_MAX_LINES, f"{path.name} has {lines} lines"
    skip = _type_checking_only(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import | ast.ImportFrom) and node.lineno not in skip:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                node.module or ""]
            for mod in names:
                assert not mod.startswith(("lightning", "pytorch_lightning", "hydra")), (
                    f"{path.name}:{node.lineno} imports {mod}")
            if isinstance(node, ast.ImportFrom) and node.level:
                side = {a.name for a in node.names} | {node.module or ""}
                assert not side & LIGHTNING_SIDE, f"{path.name}:{node.lineno} imports {side}"


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
