"""The cost figures the app reports: FLOPs per token and live tensor bytes, checked by hand."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lora_lightning import LoRAConfig, inject_lora
from lora_lightning.app.recorder import RunRecorder, flop_counter


def test_worked_example_512x512_at_r8_costs_262144_vs_8192_multiply_adds_per_token():
    """docs/app.md: W.x costs d*k multiply-adds per token, the LoRA path r*(d+k)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(512, 512, bias=False))
    token = torch.randn(1, 512)
    with FlopCounterMode(display=False) as plain:
        net(token)
    inject_lora(net, LoRAConfig(r=8, target_modules=["0"]))
    with FlopCounterMode(display=False) as torch_own:
        net(token)
    with flop_counter() as adapted:
        net(token)
    # FlopCounterMode counts a multiply-add as 2 FLOPs.
    assert plain.get_total_flops() // 2 == 262_144 == 512 * 512
    assert (adapted.get_total_flops() - plain.get_total_flops()) // 2 == 8_192 == 8 * (512 + 512)
    # torch's own table misses the in-place addmm_ that adds the B product: half the path.
    assert (torch_own.get_total_flops() - plain.get_total_flops()) // 2 == 4_096


class _Tiny(L.LightningModule):
    def __init__(self, lora: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 2))
        if lora:
            inject_lora(self.net, LoRAConfig(r=4, target_modules=["0"], modules_to_save=["2"]))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def _costs(lora: bool) -> dict:
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 64), torch.randint(0, 2, (32,)))
    recorder = RunRecorder("r", "lora" if lora else "full")
    L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, callbacks=[recorder],
              enable_progress_bar=False, enable_model_summary=False).fit(
        _Tiny(lora), torch.utils.data.DataLoader(data, batch_size=16))
    return recorder.results


def test_tensor_memory_parts_add_up_and_lora_saves_grads_and_optimizer_state():
    full, lora = _costs(False), _costs(True)
    mb = 2**20
    params = (64 * 256 + 256 + 256 * 2 + 2) * 4
    assert full["tensor_params_mb"] * mb == params
    assert full["tensor_grads_mb"] * mb == params  # every parameter has a gradient
    assert full["tensor_optimizer_mb"] * mb >= 2 * params  # AdamW: two moments each
    trained = (4 * 64 + 256 * 4 + 256 * 2 + 2) * 4  # A, B of layer 0, all of layer 2
    assert lora["tensor_grads_mb"] * mb == trained
    assert lora["peak_tensor_mb"] < full["peak_tensor_mb"]
    for r in (full, lora):
        parts = sum(r[f"tensor_{k}_mb"] for k in ("params", "grads", "optimizer", "activations"))
        assert r["peak_tensor_mb"] == pytest.approx(parts)
    # Forward 2*B*(64*256 + 256*2); backward: both weight gradients, and the input gradient
    # of layer 2 only (the batch needs none). LoRA skips layer 0's frozen weight gradient.
    forward = 2 * 16 * (64 * 256 + 256 * 2)
    assert full["train_gflops_per_step"] * 1e9 == pytest.approx(2 * forward + 2 * 16 * 256 * 2)
    assert lora["train_gflops_per_step"] < full["train_gflops_per_step"]
