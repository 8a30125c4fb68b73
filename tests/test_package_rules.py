"""Who may import whom, checked from the source with ``ast`` (issue 17, item 5).

- ``lora_lightning.app`` (the Hydra app's pieces) and ``lora_lightning.examples`` (the
  models and data) never import each other, in either direction; ``lora_lightning.train``
  is the one module that puts them together.
- The two example families, ``examples.classification`` and ``examples.language``, share
  code only through ``examples.common``.
- The examples use the library as a user would: every ``lora_lightning`` import in them is
  ``from lora_lightning import <a name in __all__>`` or an import within the examples.

Imports inside functions and ``if TYPE_CHECKING:`` blocks count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lora_lightning"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str | None = None) -> list[tuple[int, str, list[str]]]:
    """``(line, absolute module, imported names)`` of every import in ``path``.

    ``import a.b`` gives ``("a.b", [])``; ``from .x import y`` is resolved against the
    package of module ``name`` (by default the one ``path`` holds), as Python does.
    """
    name = name or _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((node.lineno, module, [alias.name for alias in node.names]))
    return out


def _targets(module: str, names: list[str]) -> list[str]:
    """What an import may bring in: the module itself and ``module.name`` per name (a name
    may be a submodule: ``from lora_lightning import app``)."""
    return [module] + [f"{module}.{n}" for n in names]


def _within(target: str, package: str) -> bool:
    return target == package or target.startswith(package + ".")


def _public_names() -> set[str]:
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return set(ast.literal_eval(node.value))
    raise AssertionError("lora_lightning/__init__.py has no __all__")


def _sources(sub: str) -> list[Path]:
    paths = sorted((PACKAGE / sub).rglob("*.py"))
    assert paths, f"no sources under lora_lightning/{sub}"
    return paths


@pytest.mark.parametrize(("sub", "other"), [("app", "examples"), ("examples", "app")])
def test_app_and_examples_never_import_each_other(sub, other):
    forbidden = f"lora_lightning.{other}"
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {module} {names or ''}".rstrip()
        for path in _sources(sub)
        for line, module, names in _imports(path)
        if any(_within(t, forbidden) for t in _targets(module, names))
    ]
    assert not found, f"lora_lightning.{sub} must not import {forbidden}:\n" + "\n".join(found)


@pytest.mark.parametrize(("sub", "other"), [("classification", "language"),
                                            ("language", "classification")])
def test_the_example_families_share_only_common(sub, other):
    forbidden = f"lora_lightning.examples.{other}"
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {module} {names or ''}".rstrip()
        for path in _sources(f"examples/{sub}")
        for line, module, names in _imports(path)
        if any(_within(t, forbidden) for t in _targets(module, names))
    ]
    assert not found, f"examples.{sub} must not import {forbidden}:\n" + "\n".join(found)


def test_examples_use_only_the_public_api():
    public = _public_names()
    found = []
    for path in _sources("examples"):
        for line, module, names in _imports(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if _within(module, "lora_lightning.examples"):
                continue
            if module == "lora_lightning":
                private = sorted(set(names) - public)
                if names and not private:
                    continue
                found.append(f"{where} imports {private or names} from lora_lightning, "
                             "not in its __all__")
            elif _within(module, "lora_lightning"):
                found.append(f"{where} imports {module} {names or ''}".rstrip())
    assert not found, (
        "the examples import lora_lightning only as `from lora_lightning import <public "
        "name>` (or from the examples themselves):\n" + "\n".join(found)
    )


def test_the_rules_see_relative_and_submodule_imports(tmp_path):
    """The checker resolves what the rules depend on (a self-test of ``_imports``)."""
    probe = tmp_path / "probe.py"
    probe.write_text("from ..common import x\nfrom ... import app, save_adapter\n"
                     "import lora_lightning.merge\nfrom .. import classification\n")
    got = _imports(probe, "lora_lightning.examples.language.probe")
    assert got == [
        (1, "lora_lightning.examples.common", ["x"]),
        (2, "lora_lightning", ["app", "save_adapter"]),
        (3, "lora_lightning.merge", []),
        (4, "lora_lightning.examples", ["classification"]),
    ]
    assert any(_within(t, "lora_lightning.app") for t in _targets(*got[1][1:]))
