"""Which layer types apply a different adapter per sample (issue 22, item 1): Linear and
HF Conv1D by the batched gather (tests/test_multi_adapter.py), Conv and Embedding by
groups (same file: its Net adapts both); nn.MultiheadAttention applies its adapter as a
weight update, which cannot differ per sample, and is refused before anything runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_lightning import (
    LoRAConfig,
    PerSampleError,
    disable_adapters,
    inject_lora,
    per_sample_adapters,
    set_adapter,
)
from tests._helpers import (
    assert_close_fp32,
    assert_unchanged,
    randomize_adapters,
    snapshot_model,
)


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.mha(x, x, x)[0])


def test_multihead_attention_is_refused_with_the_reason():
    model = Attn()
    inject_lora(model, LoRAConfig(r=2, target_modules=["mha", "fc"]), adapter="a")
    randomize_adapters(model, 1, adapter="a")
    before = snapshot_model(model)
    with pytest.raises(PerSampleError, match=r"'mha' is an nn.MultiheadAttention.*weight "
                                             r"update.*set_adapter"):
        with per_sample_adapters(model, ["a", None]):
            pass
    assert_unchanged(model, before)
    # Adapters that leave the attention module out run per sample.
    inject_lora(model, LoRAConfig(r=2, target_modules=["fc"]), adapter="b")
    randomize_adapters(model, 2, adapter="b")
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        with per_sample_adapters(model, ["b", None]):
            out = model(x)
        set_adapter(model, "b")
        only_b = model(x)
        with disable_adapters(model):
            base = model(x)
    torch.testing.assert_close(out[0], only_b[0])
    torch.testing.assert_close(out[1], base[1])
    assert (only_b[0] - base[0]).abs().max() > 1e-3


@pytest.mark.parametrize("shape", [(6, 8), (6, 1, 8), (6, 3, 8)])
def test_one_row_per_sample_and_many_give_each_adapter_alone_with_gradients(shape):
    """Linear layers take one path for one row per sample (a decode step, rows sorted by
    adapter) and another for several (gathered stacks); both equal each adapter run on
    its own samples, and gradients reach each adapter from its own samples only."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    inject_lora(model, LoRAConfig(r=2, target_modules=["0", "2"]), adapter="a")
    randomize_adapters(model, 1, adapter="a")
    inject_lora(model, LoRAConfig(r=4, alpha=2, target_modules=["0"]), adapter="b")
    randomize_adapters(model, 2, adapter="b")
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)  # both adapters train (multi-task)
    x = torch.randn(*shape)
    names = ["b", None, "a", "a", "b", None]
    with per_sample_adapters(model, names):
        mixed = model(x)
    mixed.square().sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    model.zero_grad()
    want_out = torch.empty_like(mixed)
    for name in ["a", "b", None]:
        rows = [i for i, n in enumerate(names) if n == name]
        if name is None:
            with disable_adapters(model):
                out = model(x[rows])
        else:
            set_adapter(model, name)
            out = model(x[rows])
            out.square().sum().backward()
        want_out[rows] = out.detach()
    assert_close_fp32(mixed, want_out)
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert_close_fp32(got[n], p.grad, msg=n)
    assert got["0.lora_B_b"].abs().sum() > 0 and got["2.lora_B_a"].abs().sum() > 0
