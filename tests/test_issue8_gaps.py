"""Test gaps a mutation review found (issue 8): the optimizer guard with two optimizers,
removal of stale ``.partial`` checkpoint files, and DoRA's detached norm through its
gradients."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from _tiny import TinyNet
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_lightning import LoRACallback, LoRAConfig, inject_lora

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(8, 8, generator=g),
                                    torch.randint(0, 2, (8,), generator=g)), batch_size=4)


def trainer(tmp_path, callbacks, **kw) -> L.Trainer:
    opts = dict(default_root_dir=tmp_path, max_steps=2, logger=False,
                enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, accelerator="cpu", devices=1)
    opts.update(kw)
    return L.Trainer(callbacks=callbacks, **opts)


# -- the optimizer guard checks every optimizer ---------------------------------------
class TwoOptimizers(L.LightningModule):
    """Manual optimization: fc1's tensors in one optimizer, the rest in a second."""

    def __init__(self, leave_fc2_out: bool) -> None:
        super().__init__()
        self.net = TinyNet()
        self.leave_fc2_out = leave_fc2_out
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()

    def configure_optimizers(self):
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        first = [p for n, p in trainable if ".fc1." in n]
        second = [p for n, p in trainable if ".fc1." not in n
                  and not (self.leave_fc2_out and ".fc2." in n)]
        return torch.optim.SGD(first, lr=0.1), torch.optim.SGD(second, lr=0.1)


CFG = {"r": 2, "target_modules": ["fc1", "fc2"], "modules_to_save": ["head"]}


def test_guard_accepts_adapters_spread_over_two_optimizers(tmp_path):
    module = TwoOptimizers(leave_fc2_out=False)
    trainer(tmp_path, [LoRACallback(CFG, verbose=False)]).fit(module, data())
    assert len(module.trainer.optimizers) == 2
    assert module.net.fc2.lora_B.abs().max() > 0  # trained through the second optimizer


def test_guard_refuses_an_adapter_missing_from_the_second_optimizer(tmp_path):
    module = TwoOptimizers(leave_fc2_out=True)
    with pytest.raises(RuntimeError) as err:
        trainer(tmp_path, [LoRACallback(CFG, verbose=False)]).fit(module, data())
    assert "net.fc2.lora_A" in str(err.value) and "net.fc1" not in str(err.value)


# -- stale partial files of a killed save are removed --------------------------------
class Plain(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_next_save_removes_a_stale_partial_of_a_killed_save(tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    other_pid = os.getpid() + 1
    stale = ckpts / f".last.ckpt.{other_pid}.partial"
    stale.write_bytes(b"half a checkpoint")  # left by a run killed mid-save
    unrelated = ckpts / f".other.ckpt.{other_pid}.partial"
    unrelated.write_bytes(b"not ours to remove")
    callbacks = [LoRACallback(CFG, verbose=False),
                 ModelCheckpoint(dirpath=ckpts, save_last=True, every_n_train_steps=1)]
    trainer(tmp_path, callbacks, enable_checkpointing=True).fit(Plain(), data())
    assert (ckpts / "last.ckpt").is_file()
    assert not stale.exists()
    assert not list(ckpts.glob(f".last.ckpt.{os.getpid()}.partial"))  # ours renamed away
    assert unrelated.exists()  # only partials of the file just saved are stale


# -- DoRA's norm is detached: checked through the gradients ---------------------------
def dora_layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    wrapper = nn.Sequential(nn.Linear(6, 5) if kind == "linear" else nn.Conv2d(3, 4, 3, padding=1))
    inject_lora(wrapper, LoRAConfig(r=2, alpha=4, target_modules=["0"], use_dora=True))
    layer = wrapper[0]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude):
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return layer


def reference(layer: nn.Module, x, a, b, m, detach: bool):
    """DoRA from its definition: y = m · (W + s·BA) x / ‖W + s·BA‖ + bias, the norm per
    output taken over the weight (detached, as the DoRA paper's section 4.3 does)."""
    w = layer.weight
    if isinstance(layer, nn.Linear):
        v = w + layer.scaling * b @ a
        norm = v.norm(dim=1)
        y = nn.functional.linear(x, v)
        return y * (m / (norm.detach() if detach else norm)) + layer.bias
    v = w + layer.scaling * (b.flatten(1) @ a.flatten(1)).reshape(w.shape)
    norm = v.flatten(1).norm(dim=1).view(1, -1, 1, 1)
    y = nn.functional.conv2d(x, v, padding=1)
    return y * (m / (norm.detach() if detach else norm)) + layer.bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_dora_gradients_match_the_detached_norm_math(kind):
    layer = dora_layer(kind)
    x = torch.randn((4, 6) if kind == "linear" else (2, 3, 5, 5),
                    generator=torch.Generator().manual_seed(2))
    proj = torch.randn(layer(x).shape, generator=torch.Generator().manual_seed(3))
    (layer(x) * proj).sum().backward()
    ours = [layer.lora_magnitude.grad, layer.lora_A.grad, layer.lora_B.grad]
    refs = {}
    for detach in (True, False):
        leaves = [t.detach().clone().requires_grad_(True)
                  for t in (layer.lora_magnitude, layer.lora_A, layer.lora_B)]
        m, a, b = leaves
        m_view = m.reshape(-1) if kind == "linear" else m.reshape(1, -1, 1, 1)
        (reference(layer, x, a, b, m_view, detach) * proj).sum().backward()
        refs[detach] = [t.grad for t in leaves]
    for name, g, r in zip(("magnitude", "A", "B"), ours, refs[True], strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=name)
    # the non-detached norm gives other A/B gradients: this test could tell them apart
    differ = [not torch.allclose(g, r, rtol=1e-3, atol=1e-5)
              for g, r in zip(ours[1:], refs[False][1:], strict=True)]
    assert all(differ)
