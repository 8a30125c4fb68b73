"""experiments/recipe/update_rank.py: the layer types and update sizes its tables report."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_lightning import LoRAConfig, inject_lora, merged_state_dict, save_adapter

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "recipe" / "update_rank.py"


@pytest.fixture(scope="module")
def update_rank():
    spec = importlib.util.spec_from_file_location("update_rank", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Layer(nn.Module):
    """One BERT layer's Linear names (attention.self.query, attention.output.dense,
    intermediate.dense, output.dense), small."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        self.attention.self.query = nn.Linear(6, 6)
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(6, 6)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(6, 12)
        self.output = nn.Module()
        self.output.dense = nn.Linear(12, 6)


def test_kind_tells_attention_output_dense_from_the_ffn_output_dense(update_rank):
    kind = update_rank.kind
    assert kind("encoder.layer.0.attention.self.query.weight") == "query"
    assert kind("encoder.layer.0.attention.output.dense.weight") == "attention.output.dense"
    assert kind("encoder.layer.5.output.dense.weight") == "output.dense"
    assert kind("encoder.layer.5.intermediate.dense.weight") == "intermediate.dense"
    assert kind("base_model.model.encoder.encoder.layer.1.attention.output.dense.lora_A.weight"
                ) == "attention.output.dense"


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_updates_equal_the_merged_weight_change(update_rank, tmp_path, rslora):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("layer", _Layer())
    base = {k: v.clone() for k, v in model.state_dict().items()}
    config = LoRAConfig(r=4, alpha=6, use_rslora=rslora, target_modules="all-linear")
    inject_lora(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained adapter: B away from zero
    folder = save_adapter(model, tmp_path / "adapter", config)
    merged = merged_state_dict(model)
    updates = update_rank.adapter_updates(Path(folder))
    assert len(updates) == 4
    for name, update in updates.items():
        weight = next(k for k in merged if k.endswith(".weight")
                      and update_rank.kind(k) == update_rank.kind(name))
        expected = (merged[weight] - base[weight]).double()
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(update, expected, rtol=1e-5, atol=1e-5)


def test_sizes_reports_norm_top8_norm_and_largest_singular_value(update_rank):
    u = torch.linalg.qr(torch.randn(12, 12, dtype=torch.double)).Q
    v = torch.linalg.qr(torch.randn(6, 6, dtype=torch.double)).Q
    svals = torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.double)
    update = u[:, :6] @ torch.diag(svals) @ v.T  # 12 x 6, singular values known
    updates = {f"layer.{i}.{k.replace('query', 'attention.self.query')}.weight": update
               for i in range(2) for k in update_rank.KINDS}
    row = update_rank.sizes("x", updates)
    total, top8, first = float(svals.norm()), float(svals.norm()), 3.0
    assert row == "| x | " + " | ".join([f"{total:.2f}/{top8:.2f}/{first:.2f}"] * 6) + " |"
