"""Loads are transactions: :func:`model_transaction` puts a model back exactly as it was
when anything inside the block raises.

Every public load checks what it can before its first change; this is the one mechanism
for what still fails after it (an allocation, a tensor that will not copy, a check that
needs the injected layers). It restores:

* the structure: each module's class and its ``__dict__`` (parameters, buffers, child
  modules, hooks, the LoRA layers' settings), the containers put back in place, so an
  injection, a swapped ``modules_to_save`` head or a registered hook leaves no trace;
* the adapter registries (configs, active names, heads), field by field;
* every parameter's ``requires_grad`` flag;
* the values of the tensors the load declared it writes (:meth:`Transaction.keep`), so the
  snapshot costs only what the load touches (an adapter load: the adapter tensors; a full
  checkpoint into an instance: the model).

Structure costs a few dictionary copies per module; nothing is cloned until ``keep``.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..registry import OWNER_ATTR, REGISTRY_ATTR, AdapterRegistry

_CONTAINERS = (dict, list, set)


def _copy_dict(d: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """name -> (object, a shallow copy of its contents if it is a container, else None)."""
    return {k: (v, copy.copy(v) if isinstance(v, _CONTAINERS) else None) for k, v in d.items()}


def _put_back(d: dict[str, Any], saved: dict[str, tuple[Any, Any]]) -> None:
    """Make ``d`` hold exactly the saved objects, each container with its saved contents
    (the same container objects, so references held elsewhere stay valid)."""
    d.clear()
    for k, (obj, contents) in saved.items():
        if contents is not None:
            obj.clear()
            if isinstance(obj, dict):
                obj.update(contents)
            elif isinstance(obj, list):
                obj.extend(contents)
            else:
                obj.update(contents)
        d[k] = obj


class Transaction:
    """A snapshot of one model (see the module docstring); made by
    :func:`model_transaction`."""

    def __init__(self, model: nn.Module, values: bool = True) -> None:
        self.model, self.values = model, values
        self._registries: dict[int, tuple[AdapterRegistry, dict]] = {}
        self._modules: dict[int, tuple[nn.Module, type, dict]] = {}
        self._flags: dict[int, tuple[Tensor, bool]] = {}
        self._values: dict[int, tuple[Tensor, Tensor]] = {}
        for m in model.modules():
            self._add_module_tree(m)
        # modules_to_save copies live in the registry, outside the tree while not in place
        for reg, _ in list(self._registries.values()):
            for module in _registry_modules(reg):
                for m in module.modules():
                    self._add_module_tree(m)

    def _add_module_tree(self, m: nn.Module) -> None:
        if id(m) in self._modules:
            return
        self._modules[id(m)] = (m, type(m), _copy_dict(m.__dict__))
        for p in m._parameters.values():
            if p is not None:
                self._flags[id(p)] = (p, p.requires_grad)
        for attr in (REGISTRY_ATTR, OWNER_ATTR):
            reg = m.__dict__.get(attr)
            if isinstance(reg, AdapterRegistry) and id(reg) not in self._registries:
                self._registries[id(reg)] = (reg, _registry_state(reg))

    def keep(self, tensors: Iterable[Tensor]) -> None:
        """Save the values of ``tensors`` (each once), which the load is about to write.

        Inside nested transactions (``load_adapters`` runs one ``load_adapter`` per
        folder, each its own transaction) the values are kept for every enclosing one too,
        so an outer rollback undoes what an inner, committed, transaction wrote."""
        enclosing = [tx for tx in _open() if tx.values]
        with torch.no_grad():
            for t in tensors:
                saved = None
                for tx in enclosing:
                    if id(t) not in tx._values:
                        saved = t.detach().clone() if saved is None else saved
                        tx._values[id(t)] = (t, saved)

    def restore(self) -> None:
        """Put the model back as it was when the transaction began."""
        with torch.no_grad():
            for t, saved in self._values.values():
                t.copy_(saved)
        for m, cls, saved in self._modules.values():
            if type(m) is not cls:
                m.__class__ = cls
            _put_back(m.__dict__, saved)
        for reg, state in self._registries.values():
            reg.configs = state["configs"]
            reg.active = state["active"]
            reg.heads = state["heads"]
            reg.pristine = state["pristine"]
        for p, flag in self._flags.values():
            p.requires_grad_(flag)


def _registry_state(reg: AdapterRegistry) -> dict[str, Any]:
    return {"configs": dict(reg.configs), "active": list(reg.active),
            "heads": {a: dict(h) for a, h in reg.heads.items()},
            "pristine": dict(reg.pristine)}


def _registry_modules(reg: AdapterRegistry) -> list[nn.Module]:
    return [*(m for h in reg.heads.values() for m in h.values()), *reg.pristine.values()]


@contextmanager
def model_transaction(model: nn.Module, values: bool = True) -> Iterator[Transaction]:
    """Run the block as one transaction on ``model``: if it raises (anything, an
    interrupt included), the model is restored exactly (see the module docstring) and the
    exception propagates. Call :meth:`Transaction.keep` on tensors before writing them;
    ``values=False`` keeps no values (for a model the caller discards on failure, so a
    large one is not copied for nothing).

    >>> net = nn.Linear(2, 2)
    >>> try:
    ...     with model_transaction(net) as tx:
    ...         tx.keep([net.weight])
    ...         _ = net.weight.data.zero_()
    ...         raise KeyError("refused")
    ... except KeyError:
    ...     pass
    >>> bool(net.weight.abs().sum() > 0)
    True
    """
    tx = Transaction(model, values)
    _open().append(tx)
    try:
        yield tx
    except BaseException:
        tx.restore()
        raise
    finally:
        _open().remove(tx)


_local = threading.local()


def _open() -> list[Transaction]:
    """The transactions open in this thread, outermost first."""
    if not hasattr(_local, "open"):
        _local.open = []
    return _local.open
