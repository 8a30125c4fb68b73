"""Helpers the tests share: adapters given random values, the one tolerance used to
compare outputs that two different computations produce, and a benchmark script loaded as a
module.

Bit-exact equality (``torch.equal``, ``rtol=0, atol=0``) is kept for the same computation
in one process: a tensor saved and loaded back, a value copied, a forward run twice on the
same weights. Everything else — merged vs unmerged, per-sample vs one adapter alone, fused
vs unfused, ours vs PEFT or a written-out reference, another process, a fixture written on
another machine — goes through :func:`assert_close_fp32`, because there the float32 sums
run in another order (another kernel, blocking or vector width: AVX-512, AVX2 and the
default kernels disagree in the last bits) and only agree up to rounding.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

from lora_lightning import adapter_state_dict

RTOL = 1e-5
"""Relative tolerance for float32 outputs of two computations of the same math. Float32
has eps = 1.2e-7; a reordered sum of n terms differs by a few eps times the largest
partial sum, so 1e-5 (~80 eps) covers the few hundred terms of these tiny models, while a
real bug (a missing scale, a dropped or doubled adapter) moves outputs by 1e-3 or more."""

ATOL_PER_UNIT = 1e-5
"""Absolute tolerance per unit of the output's largest magnitude (at least 1): an output
element near zero comes from cancelling terms as large as the largest output, so its
rounding error scales with that, not with its own value. 1e-5 (~80 eps again) leaves room
for rounding compounded through a few transformer layers, whose layer norms amplify it:
the tiny Whisper's merged-vs-unmerged output differed by 2.1e-6 of its largest element
with MKL_ENABLE_INSTRUCTIONS=AVX2 (1e-6 failed there); dropping an adapter moves outputs
by more than 5e-4 of it (test_architectures.assert_moved)."""


def assert_close_fp32(actual: Tensor, expected: Tensor, *, rtol: float = RTOL,
                      msg: str | None = None) -> None:
    """``actual`` equals ``expected`` up to float32 rounding of a differently ordered
    computation (see the module docstring for when to use it instead of exact equality)."""
    expected = expected.detach()
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach(), expected, rtol=rtol,
                               atol=ATOL_PER_UNIT * scale, msg=msg)


def is_adapter_tensor(name: str, param: Tensor) -> bool:
    """Ours (``lora_A``, ``lora_B``, ``lora_magnitude``, ``lora_A_<name>``...) and PEFT's
    (``lora_A.default.weight``, ``lora_embedding_B``...) adapter tensors."""
    return "lora_" in name


def is_trainable(name: str, param: Tensor) -> bool:
    """Every tensor that trains: adapters, and biases and heads where the config says so."""
    return param.requires_grad


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.3, *,
                       adapter: str | None = None,
                       select: Callable[[str, Tensor], bool] = is_adapter_tensor) -> None:
    """Move adapter tensors away from their initial values, as training would: each gets
    N(0, std²) noise added (B, which starts at zero, becomes that noise), from a generator
    seeded with ``seed``, so every machine gets the same values.

    The tensors: those of ``adapter`` (its :func:`adapter_state_dict`, heads included) when
    it is given, else every parameter for which ``select(name, param)`` holds, in
    ``named_parameters`` order.
    """
    g = torch.Generator().manual_seed(seed)
    if adapter is not None:
        params = [model.get_parameter(key) for key in adapter_state_dict(model, adapter)]
    else:
        params = [p for name, p in model.named_parameters() if select(name, p)]
    assert params, "randomize_adapters: no tensor selected"
    for p in params:
        p.add_((torch.randn(p.shape, generator=g) * std).to(p.dtype))


# -- "a refused load leaves no trace" ----------------------------------------------------
def snapshot_model(model: nn.Module) -> dict[str, object]:
    """Everything a load may change, copied: every state-dict value (cloned), each
    module's class, each parameter's ``requires_grad`` flag, and the adapters the model
    holds and applies. Compare with :func:`assert_unchanged`."""
    from lora_lightning import active_adapters, list_adapters

    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "classes": {n: type(m) for n, m in model.named_modules()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "adapters": list_adapters(model),
        "active": active_adapters(model),
    }


def assert_unchanged(model: nn.Module, before: dict[str, object]) -> None:
    """``model`` is exactly as :func:`snapshot_model` saw it: the same keys and bit-exact
    values (the same process, the same tensors: no tolerance), classes, flags, adapters."""
    now = snapshot_model(model)
    assert now["classes"] == before["classes"], "module classes changed"
    assert now["adapters"] == before["adapters"], "the adapters held changed"
    assert now["active"] == before["active"], "the active adapters changed"
    assert now["flags"] == before["flags"], "requires_grad flags changed"
    assert now["state"].keys() == before["state"].keys(), "state-dict keys changed"
    changed = [k for k, v in now["state"].items()
               if v.dtype != before["state"][k].dtype
               or not torch.equal(v, before["state"][k])]
    assert not changed, f"tensors changed: {changed}"


# -- benchmark scripts -------------------------------------------------------------------
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextmanager
def loaded_benchmark(path: str, *also_imports: str) -> Iterator[ModuleType]:
    """``benchmarks/<path>`` (``"bench_lora.py"``, ``"gpu/bench_gpu.py"``) run as a module
    named after its file, which stays in ``sys.modules`` while the block runs (dataclasses
    look their module up by name). On leaving, it is dropped from ``sys.modules`` with the
    sibling benchmarks it imports by name (``also_imports``: ``"bench_lora"``...), so the
    next test loads them afresh."""
    name = Path(path).stem
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for loaded in (name, *also_imports):
            sys.modules.pop(loaded, None)
