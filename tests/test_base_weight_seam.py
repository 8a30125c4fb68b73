"""The base-weight seam: a base stored as int8 with a scale (a stand-in for a quantized
weight) is one LoRA type that overrides ``dense_weight``/``write_weight``; injection,
training, merge and adapter files follow with no other change. And the adapter dtype the
seam resolves: float32 adapters on a bfloat16 base by default (issue 19)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_lightning import (
    LoRAConfig,
    LoRALayer,
    adapter_state_dict,
    inject_lora,
    load_adapter,
    merge_lora,
    register_layer_type,
    save_adapter,
    unmerge_lora,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Int8Linear(nn.Module):
    """y = x (s·Q)ᵀ + b with Q int8 per output row and s float32: a quantized base."""

    def __init__(self, dense: nn.Linear) -> None:
        super().__init__()
        w = dense.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 100  # headroom for merged updates
        self.weight = nn.Parameter(torch.round(w / scale).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(dense.bias.detach().clone())

    def forward(self, x):
        return F.linear(x, self.weight.float() * self.scale, self.bias)


class LoRAInt8Linear(LoRALayer, Int8Linear):
    def lora_shapes(self, r):
        return (r, self.weight.shape[1]), (self.weight.shape[0], r)

    def lora_forward(self, x, a, b):
        return F.linear(F.linear(x, a), b)

    def delta_weight(self, a, b):
        return b.float() @ a.float()

    def dense_weight(self):
        return self.weight.float() * self.scale

    @torch.no_grad()
    def write_weight(self, value):  # re-quantize with the same scale
        self.weight.copy_(torch.round(value / self.scale).clamp(-127, 127).to(torch.int8))


register_layer_type(Int8Linear, LoRAInt8Linear)


class QNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = Int8Linear(nn.Linear(16, 16))
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(torch.relu(self.fc(x)))


def test_a_quantized_base_gets_float32_adapters_that_train_merge_and_save(tmp_path):
    model = QNet()
    x = torch.randn(8, 16)
    before = model(x).detach()
    inject_lora(model, LoRAConfig(r=4, target_modules=["fc"], modules_to_save=["head"]))
    assert model.fc.lora_A.dtype == torch.float32 and model.fc.weight.dtype == torch.int8
    torch.testing.assert_close(model(x), before)
    # a step small enough that no merged weight leaves int8's range (127 * scale)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model(x).square().mean().backward()
    opt.step()
    assert model.fc.lora_B.abs().sum() > 0 and model.fc.weight.grad is None
    merged_q = model.fc.combined_weight(["default"]).detach() / model.fc.scale
    assert merged_q.abs().max() < 127
    trained = model(x).detach()
    # Merging writes through the seam, re-quantized: each weight moves by at most half an
    # int8 step, so fc's outputs by step/2 * sum|x|, and the head's by |W_head| times that.
    q = model.fc.weight.detach().clone()
    merge_lora(model)
    assert model.fc.weight.dtype == torch.int8 and not torch.equal(model.fc.weight, q)
    fc_err = model.fc.scale.reshape(-1) / 2 * x.abs().sum(dim=1, keepdim=True)  # (8, 16)
    bound = fc_err @ model.head.weight.detach().abs().T
    assert ((model(x) - trained).abs() <= bound + 1e-5).all()
    unmerge_lora(model)
    assert (model.fc.weight.int() - q.int()).abs().max() <= 1  # back within one int8 step
    # the adapter file holds float32 adapters and the head, never the int8 base
    state = adapter_state_dict(model)
    assert "fc.weight" not in state and all(t.dtype == torch.float32 for t in state.values())
    save_adapter(model, tmp_path / "a")
    fresh = load_adapter(QNet(), tmp_path / "a")  # the same int8 base as before merging
    torch.testing.assert_close(fresh(x), trained, rtol=1e-5, atol=1e-5)


def _bf16_model(rule: str | None) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)).to(torch.bfloat16)
    inject_lora(model, LoRAConfig(r=2, target_modules=["0"], adapter_dtype=rule))
    with torch.no_grad():
        model[0].lora_B.fill_(1.0)
    return model


def test_float32_adapters_on_a_bfloat16_base_train_where_bf16_adapters_cannot():
    """With a learning rate whose updates fall under bf16's resolution at 1.0 (2**-7), bf16
    adapters (adapter_dtype="base") stay unchanged and the default float32 ones train;
    outputs keep the base's dtype either way."""
    x = torch.randn(4, 8, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    moved = {}
    for rule, want in ((None, torch.float32), ("base", torch.bfloat16)):
        model = _bf16_model(rule)
        layer = model[0]
        assert layer.lora_A.dtype == layer.lora_B.dtype == want
        assert layer.weight.dtype == torch.bfloat16
        start = layer.lora_B.detach().clone()
        y = model(x)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        assert layer.lora_B.grad.dtype == want and layer.lora_B.grad.abs().sum() > 0
        torch.optim.SGD([layer.lora_B], lr=1e-5).step()
        moved[rule] = not torch.equal(layer.lora_B.detach(), start)
    assert moved == {None: True, "base": False}
