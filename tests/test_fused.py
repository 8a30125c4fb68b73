"""The one-node LoRA Linear (``layers/fused.py``): the default training forward of every
Linear-like type (``nn.Linear``, HF ``Conv1D``). Its output and its gradients (input,
A, B, a trainable bias) equal plain autograd over ``W x + b + s·B(A drop(x))`` and PEFT's for
the same adapter values; the plain ops still run where it cannot (a trainable or 8-bit
base, several adapters, DoRA). A 4-bit base takes it with bitsandbytes' own product
(tests/test_qlora.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close_fp32
from torch import nn

from lora_lightning import LoRAConfig, inject_lora, lora_layers
from lora_lightning.layers import fused

pytestmark = pytest.mark.usefixtures("one_thread")

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

KINDS = ["linear", "linear_nobias", "hf_conv1d"]


def _layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "hf_conv1d":
        layer = Conv1D(5, 6)  # (nf=out, nx=in)
        nn.init.normal_(layer.bias)
        return layer
    return nn.Linear(6, 5, bias=kind == "linear")


def _out_first(layer: nn.Module) -> torch.Tensor:
    return layer.weight.T if isinstance(layer, Conv1D) else layer.weight


def _inject(kind: str, dropout: float = 0.0, bias: str = "none", dtype=torch.float32):
    net = nn.Sequential(_layer(kind)).to(dtype)
    inject_lora(net, LoRAConfig(r=3, alpha=6, dropout=dropout, target_modules=["0"],
                                bias=bias))
    layer = net[0]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    return net, layer


def _grads(y: torch.Tensor, g: torch.Tensor, tensors: list[torch.Tensor]) -> list:
    return list(torch.autograd.grad(y, tensors, g))


def _reference(layer, x, mask=None, p=0.0):
    """Plain autograd over the formula, on the same tensors."""
    xd = x if mask is None else x * mask / (1 - p)
    base = F.linear(x, _out_first(layer), layer.bias)
    return base + layer.scaling * (xd @ layer.lora_A.T) @ layer.lora_B.T


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_output_and_gradients_equal_plain_autograd(kind, dropout):
    net, layer = _inject(kind, dropout, bias="all" if kind != "linear_nobias" else "none")
    net.train()
    assert layer._route(torch.ones(1, 6), ["default"], False) == "fused"
    x = torch.randn(2, 4, 6, requires_grad=True)
    params = [x, layer.lora_A, layer.lora_B] + ([layer.bias] if layer.bias is not None else [])
    assert all(p.requires_grad for p in params)
    torch.manual_seed(7)
    y = net(x)
    mask = None
    if dropout:
        torch.manual_seed(7)  # the very mask the layer drew
        mask = fused.dropout_mask(x.reshape(-1, 6), dropout).reshape(x.shape)
        assert 0 < mask.sum() < mask.numel()
    ref = _reference(layer, x, mask, dropout)
    assert_close_fp32(y, ref)
    g = torch.randn_like(y)
    for got, want in zip(_grads(y, g, params), _grads(ref, g, params), strict=True):
        assert got.abs().max() > 0
        assert_close_fp32(got, want)


@pytest.mark.parametrize("kind", ["linear", "hf_conv1d"])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_autocast_with_float32_adapters_matches_plain_autograd(kind, base_dtype):
    """bf16 autocast, a float32 or bfloat16 base and float32 adapters (the adapters get
    float32 gradients): the same values autograd gives under the same autocast."""
    net, layer = _inject(kind, dtype=base_dtype)
    assert layer.lora_A.dtype == torch.float32
    x = torch.randn(2, 4, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._route(x, ["default"], False) == "fused"
        y = net(x)
        ref = _reference(layer, x)
    assert y.dtype == ref.dtype == torch.bfloat16
    g = torch.randn_like(y)
    params = [x, layer.lora_A, layer.lora_B]
    for got, want in zip(_grads(y, g, params), _grads(ref, g, params), strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", ["linear", "hf_conv1d"])
def test_a_bf16_base_computes_float32_adapters_in_bf16_without_casting_the_input(kind):
    """bf16-true (no autocast): the adapters stay float32 and get float32 gradients; the
    math runs in bf16 (the adapter tensors are cast, the activation is not), so it matches
    a float32 computation on the same bf16 values to bf16 rounding."""
    net, layer = _inject(kind, dtype=torch.bfloat16)
    x = torch.randn(2, 4, 6, dtype=torch.bfloat16, requires_grad=True)
    assert layer._route(x, ["default"], False) == "fused"
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = net(x)
    assert y.dtype == torch.bfloat16
    assert not [t for t in saved if t.numel() >= x.numel() and t.dtype == torch.float32]
    x32 = x.detach().float().requires_grad_()
    w, bias = _out_first(layer).float(), None if layer.bias is None else layer.bias.float()
    ref = F.linear(x32, w, bias) + layer.scaling * (x32 @ layer.lora_A.T) @ layer.lora_B.T
    # bf16 keeps 8 bits: errors up to ~2^-8 of the largest term
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=1e-2 * float(ref.abs().max()))
    g = torch.randn(y.shape)
    got = _grads(y, g.bfloat16(), [x, layer.lora_A, layer.lora_B])
    want = _grads(ref, g, [x32, layer.lora_A, layer.lora_B])
    assert [t.dtype for t in got] == [torch.bfloat16, torch.float32, torch.float32]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b, rtol=3e-2, atol=3e-2 * float(b.abs().max()))


@pytest.mark.parametrize("kind", ["linear", "hf_conv1d"])
def test_gradients_equal_peft_for_the_same_adapter_values(kind):
    peft = pytest.importorskip("peft")
    base = nn.Sequential(_layer(kind), nn.Tanh(),
                         Conv1D(4, 5) if kind == "hf_conv1d" else nn.Linear(5, 4))
    cfg = dict(r=3, alpha=6, target_modules=["0", "2"])
    ours = copy.deepcopy(base)
    inject_lora(ours, LoRAConfig(**cfg))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=3, lora_alpha=6, target_modules=["0", "2"], fan_in_fan_out=kind == "hf_conv1d"))
    g = torch.Generator().manual_seed(2)
    pairs = []
    for name, layer in lora_layers(ours).items():
        with torch.no_grad():
            pa = theirs.get_parameter(f"base_model.model.{name}.lora_A.default.weight")
            pb = theirs.get_parameter(f"base_model.model.{name}.lora_B.default.weight")
            pb.copy_(torch.randn(pb.shape, generator=g))
            layer.lora_A.copy_(pa)
            layer.lora_B.copy_(pb)
        pairs += [(layer.lora_A, pa), (layer.lora_B, pb)]
    x = torch.randn(3, 6)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    assert_close_fp32(y1, y2)
    y1.square().sum().backward()
    y2.square().sum().backward()
    assert_close_fp32(x1.grad, x2.grad)
    for mine, peft_param in pairs:
        assert mine.grad.abs().max() > 0
        assert_close_fp32(mine.grad, peft_param.grad)


def test_gradcheck_in_double_precision():
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: fused.linear_lora(t[0], w, t[1], t[2], t[3], 0.7, 0.0), (x, bias, a, b))


def test_plain_ops_run_where_the_fused_node_cannot():
    net, layer = _inject("linear")
    x = torch.randn(2, 6)
    assert layer._route(x, ["default"], False) == "fused"
    with torch.no_grad():  # inference: the plain fused addmm_ (or the fold for many rows)
        assert layer._route(x, ["default"], False) == "in_place"
    layer.weight.requires_grad_(True)  # a trainable base weight needs its own gradient
    assert layer._route(x, ["default"], False) == "in_place"
    y = net(x)
    y.sum().backward()
    assert layer.weight.grad is not None and layer.lora_B.grad.abs().max() > 0
    layer.weight.requires_grad_(False)
    assert layer._route(x.double(), ["default"], False) == "in_place"  # dtypes differ
