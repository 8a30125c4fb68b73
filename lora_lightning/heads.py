"""``modules_to_save`` in the adapters' dtype.

A module in ``modules_to_save`` (a new classifier head, an ``lm_head``) trains fully. On a
float16/bfloat16 base it follows the adapters' rule (``LoRAConfig.adapter_dtype``; see
:func:`~lora_lightning.layers.base.resolve_dtype`): by default it trains in float32, so an
update below the half type's resolution is not lost; ``adapter_dtype="base"`` keeps it in
the base's dtype. On a float32 base nothing changes.

The trained head's class is swapped to a subclass of its own type (:class:`SavedModule`),
as LoRA layers' are, also on a float32 base (a later ``model.to(torch.bfloat16)`` must not
take it along). Where it needs another dtype than the base's at injection, it is a copy
of the module (as PEFT's ``ModulesToSaveWrapper`` copies it: a weight it shared with
another module is no longer shared). The subclass

* where its dtype is not the base's, casts floating-point inputs to its dtype and
  floating-point outputs back to the base's (elsewhere it runs as the plain module), so
  the layers after it get what the base head would have given them (under autocast, an
  op autocast runs in float32, such as ``LayerNorm``, then gives the base dtype where the
  base head gave float32: the layers after it work either way);
* keeps its dtype when the model is converted (``model.to(torch.bfloat16)``, Lightning's
  ``precision="bf16-true"``): the conversion sets the base dtype, and the head goes back to
  the rule's dtype for it.

Its state-dict keys are the module's own. The copies from before any adapter
(``AdapterRegistry.pristine``, for samples without an adapter and ``disable_adapters``)
stay plain modules of the base dtype. A merged export and
:func:`~lora_lightning.merge.unload_lora` cast a head once to the base dtype
(:func:`plain_head`), as merged weights are. A LoRA adapter on another adapter's head
turns it plain first; where the head is kept in another dtype than the base's, the
planner refuses it (a LoRA layer computes in its base weight's dtype).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .layers.base import resolve_dtype
from .registry import state_keys


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating-point tensor in it (also inside tuples, lists and
    dicts) in ``dtype``; anything else as it is."""
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if type(value) in (tuple, list):  # not a namedtuple or a model-output class
        return type(value)(_cast(v, dtype) for v in value)
    if type(value) is dict:
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def _floating_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of the module's first floating-point parameter, or ``None``."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def _tensors(module: nn.Module) -> dict[tuple[int, str, str], tuple[Tensor, Tensor | None]]:
    """(submodule id, kind, name) -> (values, gradient) of each tensor in ``module``."""
    out = {}
    for m in module.modules():
        for k, p in m._parameters.items():
            if p is not None:
                out[(id(m), "p", k)] = (p.data, p.grad)
        for k, b in m._buffers.items():
            if b is not None:
                out[(id(m), "b", k)] = (b, None)
    return out


@torch.no_grad()
def _convert(module: nn.Module, dtype: torch.dtype,
             before: dict[tuple[int, str, str], tuple[Tensor, Tensor | None]] | None = None
             ) -> None:
    """Every floating-point parameter (and its gradient) and buffer of ``module`` in
    ``dtype``, in place (the parameters stay the same objects); from the values in
    ``before`` where given (:func:`_tensors`), on the tensor's current device."""
    before = before or {}
    for m in module.modules():
        for k, p in m._parameters.items():
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                data, grad = before.get((id(m), "p", k), (p.data, p.grad))
                p.data = data.to(device=p.device, dtype=dtype)
                if p.grad is not None:
                    p.grad = (grad if grad is not None else p.grad).to(device=p.device,
                                                                       dtype=dtype)
        for k, b in m._buffers.items():
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                m._buffers[k] = before.get((id(m), "b", k), (b, None))[0].to(
                    device=b.device, dtype=dtype)


class SavedModule:
    """Mixin of a ``modules_to_save`` module kept in its own dtype (see the module
    docstring). Never instantiated: :func:`as_saved` swaps a module's class to a subclass
    of this and of the module's own type."""

    _saved_base_class: ClassVar[type[nn.Module]]
    _saved_rule: str | None
    """``LoRAConfig.adapter_dtype`` of the adapter that owns this copy."""
    _saved_base_dtype: torch.dtype
    """The dtype the base computes in: what the base head took and gave."""

    def saved_dtype(self) -> torch.dtype:
        """The dtype the head is kept and computes in."""
        return resolve_dtype(self._saved_base_dtype, self._saved_rule)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        dtype = self.saved_dtype()
        if dtype == self._saved_base_dtype:  # kept in the base's dtype: the module as it is
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        out = super().forward(*_cast(args, dtype), **_cast(kwargs, dtype))  # type: ignore[misc]
        return _cast(out, self._saved_base_dtype)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # The class is made at run time: pickle (``torch.save(model)``, spawned processes)
        # names the module's own type and rebuilds the subclass from it.
        _, _, *rest = super().__reduce_ex__(protocol)  # type: ignore[misc]
        return (_new_saved, (self._saved_base_class,), *rest)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # What a tensor of the base dtype becomes under ``fn`` (``module.to(bfloat16)``,
        # ``.half()``, a device move) is the new base dtype; the head then goes back to the
        # rule's dtype for it, as LoRA layers' adapters do.
        # Each tensor comes back from its values before the conversion (a round trip
        # through bf16 would round them).
        ref = next(self.parameters(), None)  # type: ignore[attr-defined]
        device = ref.device if ref is not None else "cpu"
        probe = fn(torch.empty(0, dtype=self._saved_base_dtype, device=device))
        before = _tensors(self)  # type: ignore[arg-type]
        out = super()._apply(fn, recurse)  # type: ignore[misc]
        if isinstance(probe, Tensor) and probe.is_floating_point():
            self._saved_base_dtype = probe.dtype
        _convert(self, self.saved_dtype(), before)  # type: ignore[arg-type]
        return out


_CLASSES: dict[type, type] = {}


def _saved_class(cls: type[nn.Module]) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"{cls.__name__}ToSave", (SavedModule, cls),
                             {"_saved_base_class": cls, "__module__": __name__})
    return _CLASSES[cls]


def _new_saved(base: type[nn.Module]) -> nn.Module:
    """An empty instance of ``base``'s :class:`SavedModule` class (unpickling fills it)."""
    cls = _saved_class(base)
    return cls.__new__(cls)


def saved_dtype_for(module: nn.Module, rule: str | None) -> torch.dtype | None:
    """The dtype ``module`` (a plain ``modules_to_save`` module) trains in under ``rule``,
    or ``None`` when that is its own (a float32 base by default; no floating parameter)."""
    base = _floating_dtype(module)
    if base is None:
        return None
    want = resolve_dtype(base, rule)
    return want if want != base else None


def as_saved(module: nn.Module, rule: str | None) -> nn.Module:
    """``module`` kept in the dtype ``rule`` gives it (converted in place when that is not
    its own), also when the model is converted later; a module without floating-point
    parameters is left as it is. Returns ``module``."""
    base = _floating_dtype(module)
    if base is None or isinstance(module, SavedModule):
        return module
    module.__class__ = _saved_class(type(module))
    module._saved_rule, module._saved_base_dtype = rule, base
    _convert(module, resolve_dtype(base, rule))
    return module


def plain_head(module: nn.Module) -> nn.Module:
    """A :class:`SavedModule` back to its own type, cast once to the base dtype (in
    place); any other module unchanged. Returns ``module``."""
    if isinstance(module, SavedModule):
        _convert(module, module._saved_base_dtype)
        module.__class__ = module._saved_base_class
        for attr in ("_saved_rule", "_saved_base_dtype"):
            module.__dict__.pop(attr, None)
    return module


def saved_base_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """State-dict key -> base dtype, for each floating-point tensor of a
    :class:`SavedModule` in ``model``: what a merged export casts it to."""
    keys = state_keys(model)
    out = {}
    for m in model.modules():
        if isinstance(m, SavedModule):
            for t in (*m.parameters(), *m.buffers()):  # type: ignore[attr-defined]
                if id(t) in keys and t.is_floating_point():
                    out[keys[id(t)]] = m._saved_base_dtype
    return out
