"""``LoRACallback(config, adapter="b")`` on a model that already carries adapter a
(issue 10): a stays frozen and unchanged and is not saved; the checkpoint holds b and its
head only, resumes exactly, and loads into a model that holds a."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from _helpers import randomize_adapters
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_lightning import (
    LoRACallback,
    LoRAConfig,
    active_adapters,
    adapter_state_dict,
    inject_lora,
    list_adapters,
    load_lora_checkpoint,
    read_checkpoint,
    set_adapter,
)

pytestmark = pytest.mark.usefixtures("one_thread")
A = LoRAConfig(r=2, target_modules=["fc1", "fc2"], modules_to_save=["head"])
B = LoRAConfig(r=4, target_modules=["fc1"], modules_to_save=["head"])


class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 12)
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=0.05)


def with_a() -> Module:
    module = Module()
    inject_lora(module, A, adapter="a")
    randomize_adapters(module, 5, std=0.2, adapter="a")
    return module


def loader():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, 6, generator=g),
                                    torch.randint(0, 2, (32,), generator=g)), batch_size=8)


def fit(tmp_path, module, epochs, ckpt_path=None):
    """Fit for ``epochs`` epochs of 4 steps (checkpoints at epoch ends resume exactly)."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[LoRACallback(B, adapter="b", verbose=False), ckpt])
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return tmp_path / "ckpts" / "last.ckpt"


def test_training_b_leaves_a_frozen_unchanged_and_unsaved(tmp_path):
    module = with_a()
    a_before = {k: v.clone() for k, v in adapter_state_dict(module, "a").items()}
    path = fit(tmp_path, module, 1)
    assert list_adapters(module) == ["a", "b"] and active_adapters(module) == ["b"]
    for key, value in adapter_state_dict(module, "a").items():
        assert torch.equal(value, a_before[key]), key
    assert not torch.equal(module.fc1.lora_B_b, torch.zeros_like(module.fc1.lora_B_b))
    saved = read_checkpoint(path)
    assert saved["lora_lightning"]["adapter"] == "b"
    assert set(saved["state_dict"]) == {"fc1.lora_A_b", "fc1.lora_B_b", "head.weight",
                                        "head.bias"}


def test_a_checkpoint_of_b_resumes_exactly(tmp_path):
    straight = with_a()
    fit(tmp_path / "straight", straight, 2)
    first = with_a()
    path = fit(tmp_path / "split", first, 1)
    resumed = with_a()
    fit(tmp_path / "split", resumed, 2, ckpt_path=path)
    for key, value in adapter_state_dict(straight, "b").items():
        torch.testing.assert_close(adapter_state_dict(resumed, "b")[key], value, rtol=0,
                                   atol=0, msg=key)


def test_load_lora_checkpoint_adds_b_to_a_model_that_holds_a(tmp_path):
    trained = with_a()
    path = fit(tmp_path, trained, 1)
    target = with_a()
    load_lora_checkpoint(target, path)
    assert list_adapters(target) == ["a", "b"]
    x = torch.randn(5, 6)
    for name in ("a", "b"):
        set_adapter(trained, name)
        set_adapter(target, name)
        torch.testing.assert_close(target(x), trained(x), rtol=0, atol=0, msg=name)
