"""LoRA inside torch's attention modules: ``nn.TransformerEncoderLayer`` keeps its adapters
on the eval-mode fast path, and ``nn.MultiheadAttention`` adapts its packed input
projection and its output projection (merge, unmerge, PEFT files)."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import assert_close_fp32, randomize_adapters
from torch import nn

from lora_lightning import (
    LoRAConfig,
    inject_lora,
    lora_layers,
    merge_lora,
    save_adapter,
    unmerge_lora,
)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))


# -- TransformerEncoderLayer: torch's fast path -------------------------------------------
def encoder_layer() -> nn.Module:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0,
                                      batch_first=True).eval()


def test_encoder_layer_in_eval_mode_uses_its_adapters():
    base = encoder_layer()
    layer = copy.deepcopy(base)
    inject_lora(layer, LoRAConfig(r=2, alpha=4, target_modules=["linear1", "linear2"]))
    randomize_adapters(layer)
    with torch.no_grad():
        y_eval = layer(X)
        y_train = layer.train()(X)  # dropout 0: the same function, on the slow path
        layer.eval()
        assert (y_eval - base(X)).abs().max() > 1e-2
    assert_close_fp32(y_eval, y_train)


def test_encoder_layer_trains_in_eval_mode():
    layer = encoder_layer()
    inject_lora(layer, LoRAConfig(r=2, alpha=4, target_modules=["linear1", "linear2"]))
    layer(X).square().mean().backward()
    for name, m in lora_layers(layer).items():
        assert m.lora_B.grad is not None and m.lora_B.grad.abs().max() > 0, name


# -- nn.MultiheadAttention --------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def attention() -> nn.Module:
    torch.manual_seed(0)
    return Attention().eval()


def test_multihead_attention_adapts_in_proj_and_out_proj():
    base = attention()
    model = copy.deepcopy(base)
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["attn"]))
    with torch.no_grad():
        assert_close_fp32(model(X), base(X))  # B = 0; our forward, not MHA's fused one
    randomize_adapters(model)
    with torch.no_grad():
        y = model(X)  # eval mode: the fast path must not bypass the adapters
        assert (y - base(X)).abs().max() > 1e-2
        assert_close_fp32(model.train()(X), y)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model)
    # both the packed input projection and the output projection carry an update
    assert not torch.allclose(model.attn.in_proj_weight, base.attn.in_proj_weight)
    assert not torch.allclose(model.attn.out_proj.weight, base.attn.out_proj.weight)
    with torch.no_grad():
        assert_close_fp32(model(X), y)
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        assert_close_fp32(v, before[k], msg=k)  # W + ΔW - ΔW: W up to rounding


@pytest.mark.xfail(strict=True, reason="PEFT 0.21.2 applies an nn.MultiheadAttention out_proj adapter twice; ours matches W + scale*B*A")
def test_multihead_attention_adapter_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    base = attention()
    model = copy.deepcopy(base)
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["attn"]))
    randomize_adapters(model)
    save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).train()
    with torch.no_grad():  # train mode (dropout 0): PEFT's own MHA is bypassed in eval
        assert_close_fp32(pm(X), model.train()(X))


def test_out_proj_alone_is_adapted_or_refused_naming_multihead_attention():
    base = attention()
    model = copy.deepcopy(base)
    try:
        inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["attn.out_proj"]))
    except Exception as err:  # refusing is correct if it says why
        assert "MultiheadAttention" in str(err)
        return
    randomize_adapters(model)
    with torch.no_grad():
        y = model(X)
        assert (y - base(X)).abs().max() > 1e-2  # not bypassed by MHA's functional forward
        merge_lora(model)
        assert_close_fp32(model(X), y)
