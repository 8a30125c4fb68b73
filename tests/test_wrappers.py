"""Wrapper name prefixes on CPU (issue 19, item 3): a model whose blocks are wrapped by
torch's ``checkpoint_wrapper`` (activation checkpointing) or one of whose blocks is
``torch.compile``d trains through the callback, saves an adapter-only checkpoint under the
plain model's names, resumes exactly, and its checkpoint and adapter directory load into
the plain, unwrapped model (and back)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from _helpers import assert_close_fp32
from _tiny import sign_data
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from lora_lightning import (
    LoRACallback,
    LoRAConfig,
    base_fingerprint,
    inject_lora,
    load_adapter,
    load_lora_checkpoint,
    save_adapter,
)

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = LoRAConfig(r=2, target_modules=["fc1", "fc2"])
ADAPTER_KEYS = {f"net.blocks.{b}.{fc}.lora_{ab}" for b in (0, 1) for fc in ("fc1", "fc2")
                for ab in "AB"}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, wrap: str = "none") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 2)
        if wrap == "checkpoint":
            self.blocks = nn.ModuleList([checkpoint_wrapper(b) for b in self.blocks])
        elif wrap == "compile":
            self.blocks[1] = torch.compile(self.blocks[1], backend="eager")

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class Module(L.LightningModule):
    def __init__(self, wrap: str = "none") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = Net(wrap)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def trainer(root, epochs: int) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False,
                     default_root_dir=root, callbacks=[LoRACallback(CONFIG, verbose=False)])


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("wrap", ["checkpoint", "compile"])
def test_a_wrapped_model_saves_resumes_and_loads_into_the_plain_model(tmp_path, wrap):
    reference = Module(wrap)
    trainer(tmp_path, 2).fit(reference, sign_data())

    first = Module(wrap)
    t = trainer(tmp_path, 1)
    t.fit(first, sign_data())
    path = tmp_path / "wrapped.ckpt"
    t.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    # adapter-only, under the plain model's names: no wrapper segment, no base weight
    assert set(saved["state_dict"]) == ADAPTER_KEYS
    assert saved["lora_lightning"]["injected"] == sorted(
        f"net.blocks.{b}.{fc}" for b in (0, 1) for fc in ("fc1", "fc2"))

    resumed = Module(wrap)
    trainer(tmp_path, 2).fit(resumed, sign_data(), ckpt_path=path)
    for key, value in reference.state_dict().items():
        assert_close_fp32(resumed.state_dict()[key], value)

    plain = load_lora_checkpoint(Module, path, wrap="none")  # into the unwrapped model
    with torch.no_grad():
        assert_close_fp32(plain(X), first.eval()(X))
    assert base_fingerprint(plain) == base_fingerprint(first)


@pytest.mark.parametrize("wrap", ["checkpoint", "compile"])
def test_an_adapter_directory_of_a_wrapped_model_loads_into_the_plain_one_and_back(
        tmp_path, wrap):
    wrapped = Net(wrap)
    inject_lora(wrapped, CONFIG)
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_(generator=torch.Generator().manual_seed(len(n)))
    save_adapter(wrapped, tmp_path / "a")
    plain = load_adapter(Net("none"), tmp_path / "a")
    with torch.no_grad():
        assert_close_fp32(plain(X), wrapped(X))
    save_adapter(plain, tmp_path / "b")
    again = load_adapter(Net(wrap), tmp_path / "b")
    with torch.no_grad():
        assert_close_fp32(again(X), wrapped(X))
