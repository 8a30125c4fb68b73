"""``lora_param_groups`` and LoRA+ (``LoRAConfig.loraplus_lr_ratio``): the groups, the
rates an optimizer built from them applies, and the callback's check."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_lightning import (
    ArgumentError,
    ConfigError,
    LoRACallback,
    LoRAConfig,
    NoAdaptersError,
    inject_lora,
    lora_param_groups,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def injected(**config) -> Net:
    torch.manual_seed(0)
    net = Net()
    inject_lora(net, LoRAConfig(r=2, target_modules=["fc1", "fc2"], modules_to_save=["head"],
                                **config))
    return net


def names_of(net: nn.Module, params) -> list[str]:
    by_id = {id(p): n for n, p in net.named_parameters()}
    return [by_id[id(p)] for p in params]


def test_without_loraplus_one_group_holds_every_trainable_tensor_once():
    net = injected()
    groups = lora_param_groups(net, lr=1e-3, weight_decay=0.1)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [("lora", 1e-3, 0.1)]
    assert names_of(net, groups[0]["params"]) == [
        n for n, p in net.named_parameters() if p.requires_grad]


def test_loraplus_from_the_config_gives_b_the_larger_rate():
    net = injected(loraplus_lr_ratio=16)
    groups = {g["name"]: g for g in lora_param_groups(net, lr=1e-3)}
    assert groups["lora_B"]["lr"] == pytest.approx(16e-3)
    assert groups["lora"]["lr"] == 1e-3
    assert sorted(names_of(net, groups["lora_B"]["params"])) == ["fc1.lora_B", "fc2.lora_B"]
    others = sorted(names_of(net, groups["lora"]["params"]))
    assert others == ["fc1.lora_A", "fc2.lora_A", "head.bias", "head.weight"]
    # an explicit ratio overrides the config's
    explicit = {g["name"]: g["lr"] for g in lora_param_groups(net, lr=1.0, loraplus_lr_ratio=2)}
    assert explicit == {"lora": 1.0, "lora_B": 2.0}


def test_an_optimizer_from_the_groups_moves_b_ratio_times_as_far():
    """Plain SGD: each tensor moves by lr * grad, so B's step must be 16x its lr-only step
    (in float64, so that p_after - p_before keeps the step's digits)."""
    steps = {}
    for ratio in (None, 16):
        net = injected(loraplus_lr_ratio=ratio).double()
        with torch.no_grad():
            net.fc1.lora_B.normal_()  # a non-zero B gives A a gradient too
            net.fc2.lora_B.normal_()
        start = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
        opt = torch.optim.SGD(lora_param_groups(net, lr=1e-2))
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        net(x).sum().backward()
        opt.step()
        steps[ratio] = {n: (p.detach() - start[n]) for n, p in net.named_parameters()
                        if p.requires_grad}
    for name, plain in steps[None].items():
        scale = 16 if name.endswith("lora_B") else 1
        assert plain.abs().max() > 0, name
        torch.testing.assert_close(steps[16][name], scale * plain, rtol=1e-9, atol=0, msg=name)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lr": 0}, r"lora_param_groups\.lr: got 0; expected a finite number > 0"),
    ({"lr": float("nan")}, r"lora_param_groups\.lr"),
    ({"lr": 1e-3, "loraplus_lr_ratio": -1}, r"loraplus_lr_ratio: got -1"),
])
def test_bad_arguments_are_refused_naming_the_argument(kwargs, match):
    with pytest.raises(ArgumentError, match=match):
        lora_param_groups(injected(), **kwargs)


def test_a_model_with_nothing_to_train_is_refused():
    net = Net().requires_grad_(False)
    with pytest.raises(NoAdaptersError, match="no trainable parameters"):
        lora_param_groups(net, lr=1e-3)


@pytest.mark.parametrize(("value", "exc"), [(0, ValueError), (-2.0, ValueError),
                                            (float("inf"), ValueError), ("16", TypeError),
                                            (True, TypeError)])
def test_the_config_refuses_a_bad_ratio(value, exc):
    with pytest.raises(ConfigError, match="LoRAConfig.loraplus_lr_ratio") as info:
        LoRAConfig(loraplus_lr_ratio=value)
    assert isinstance(info.value, exc)


class Module(L.LightningModule):
    def __init__(self, use_groups: bool = True) -> None:
        super().__init__()
        self.use_groups = use_groups
        self.net = Net()

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        if self.use_groups:
            return torch.optim.AdamW(lora_param_groups(self, lr=1e-3))
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def fit(module: Module, ratio: float | None) -> L.Trainer:
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)
    cfg = LoRAConfig(r=2, target_modules=["fc1", "fc2"], modules_to_save=["head"],
                     loraplus_lr_ratio=ratio)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[LoRACallback(cfg, verbose=False)])
    trainer.fit(module, data)
    return trainer


def test_the_callback_s_model_gets_loraplus_groups_in_configure_optimizers():
    module = Module()
    trainer = fit(module, 16)
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert groups["lora_B"]["lr"] == pytest.approx(16 * groups["lora"]["lr"])
    assert sorted(names_of(module, groups["lora_B"]["params"])) == [
        "net.fc1.lora_B", "net.fc2.lora_B"]


def test_the_callback_warns_when_the_optimizer_ignores_loraplus():
    with pytest.warns(UserWarning, match=r"loraplus_lr_ratio=16.*lora_param_groups"):
        fit(Module(use_groups=False), 16)
