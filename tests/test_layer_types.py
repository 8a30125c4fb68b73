"""The layer contract through ``register_layer_type``: ``nn.Conv3d`` (registered by the
library the same way a user would) and a module type defined only here work end to end:
injection, a training step, merge, adapter files (PEFT's, for Conv3d) and Trainer resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lora_lightning import (
    LayerTypeError,
    LoRACallback,
    LoRAConfig,
    LoRALayer,
    UnsupportedModuleError,
    inject_lora,
    layer_types,
    load_adapter,
    load_lora_checkpoint,
    lora_layers,
    merge_lora,
    merged_state_dict,
    register_layer_type,
    save_adapter,
    unmerge_lora,
)

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = {"rtol": 1e-5, "atol": 1e-5}  # different code paths: float32 rounding only


class TransposedProj(nn.Module):
    """A projection of one's own: the weight is stored (in, out), as GPT-2's Conv1D does."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight + self.bias


class LoRATransposedProj(LoRALayer, TransposedProj):
    all_linear = True

    def lora_shapes(self, r):
        return (r, self.weight.shape[0]), (self.weight.shape[1], r)

    def lora_forward(self, x, a, b):
        return (x @ a.T) @ b.T

    def delta_weight(self, a, b):
        return (b.float() @ a.float()).T

    def out_first(self, w):
        return w.T


register_layer_type(TransposedProj, LoRATransposedProj)


class ProjNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = TransposedProj(6, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.proj(x)))


class VoxelNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 4, kernel_size=3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3, 4)))


CASES = {
    "conv3d": (VoxelNet, ["conv"], lambda: torch.randn(3, 2, 4, 5, 5)),
    "custom": (ProjNet, ["proj"], lambda: torch.randn(5, 6)),
}


def build(case: str, seed: int = 0, **config):
    cls, targets, make_x = CASES[case]
    torch.manual_seed(seed)
    model = cls()
    cfg = LoRAConfig(r=2, alpha=4, target_modules=targets, modules_to_save=["head"], **config)
    return model, cfg, make_x


def train_step(model: nn.Module, x: Tensor) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(x).square().mean().backward()
    opt.step()


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_registered_type_injects_trains_and_merges(case):
    model, cfg, make_x = build(case)
    x = make_x()
    before = model(x).detach()
    report = inject_lora(model, cfg)
    layer = model.get_submodule(cfg.target_modules[0])
    assert isinstance(layer, LoRALayer) and report.injected == cfg.target_modules
    torch.testing.assert_close(model(x), before, **TOL)  # B = 0: unchanged
    base = layer.base_weight().detach().clone()
    train_step(model, x)
    assert torch.equal(layer.base_weight(), base)  # the base stays frozen
    assert layer.lora_B.abs().sum() > 0
    trained = model(x).detach()
    assert not torch.allclose(trained, before)
    merge_lora(model)
    torch.testing.assert_close(model(x), trained, **TOL)
    unmerge_lora(model)
    torch.testing.assert_close(layer.base_weight(), base, **TOL)
    plain = build(case)[0]
    plain.load_state_dict(merged_state_dict(model))
    torch.testing.assert_close(plain(x), trained, **TOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_registered_type_round_trips_through_an_adapter_directory(case, tmp_path):
    model, cfg, make_x = build(case)
    x = make_x()
    inject_lora(model, cfg)
    train_step(model, x)
    save_adapter(model, tmp_path / "adapter")
    fresh = load_adapter(build(case)[0], tmp_path / "adapter")
    torch.testing.assert_close(fresh(x), model(x), **TOL)


def test_a_conv3d_adapter_loads_in_peft_and_peft_s_loads_here(tmp_path):
    peft = pytest.importorskip("peft")
    model, cfg, make_x = build("conv3d")
    x = make_x()
    inject_lora(model, cfg)
    train_step(model, x)
    save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(build("conv3d")[0], str(tmp_path / "ours"))
    torch.testing.assert_close(theirs(x), model(x), **TOL)
    # and back: PEFT's own file of its own adapter
    peft_model = peft.get_peft_model(build("conv3d", seed=1)[0], peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["conv"], modules_to_save=["head"],
        init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    here = load_adapter(build("conv3d", seed=1)[0], tmp_path / "peft")
    torch.testing.assert_close(here(x), peft_model(x), **TOL)


class Wrapped(L.LightningModule):
    def __init__(self, case: str = "custom") -> None:
        super().__init__()
        self.case = case
        self.net = build(case)[0]

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _data(case: str) -> DataLoader:
    torch.manual_seed(3)
    x = torch.cat([CASES[case][2]() for _ in range(4)])
    return DataLoader(TensorDataset(x), batch_size=x.shape[0] // 4)


def _trainer(root, epochs: int, case: str) -> L.Trainer:
    cls, targets, _ = CASES[case]
    cfg = LoRAConfig(r=2, alpha=4, target_modules=targets, modules_to_save=["head"])
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, default_root_dir=root,
                     callbacks=[LoRACallback(cfg, verbose=False)])


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_registered_type_resumes_exactly_and_loads_outside_the_trainer(case, tmp_path):
    reference = Wrapped(case)
    _trainer(tmp_path, 2, case).fit(reference, _data(case))
    first = Wrapped(case)
    t = _trainer(tmp_path, 1, case)
    t.fit(first, _data(case))
    path = tmp_path / "one.ckpt"
    t.save_checkpoint(path)
    assert all("weight" not in k or "head" in k
               for k in torch.load(path, weights_only=False)["state_dict"])  # adapter-only
    resumed = Wrapped(case)
    _trainer(tmp_path, 2, case).fit(resumed, _data(case), ckpt_path=path)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-5, atol=1e-6,
                                   msg=key)
    loaded = load_lora_checkpoint(Wrapped, path, case=case)
    x = CASES[case][2]()
    torch.testing.assert_close(loaded(x), first.eval()(x), **TOL)


def test_all_linear_asks_the_type():
    model = ProjNet()
    report = inject_lora(model, LoRAConfig(r=2, target_modules="all-linear"))
    assert report.injected == ["proj"]  # "head" is an output head; proj says all_linear
    assert TransposedProj in layer_types() and nn.Conv3d in layer_types()


def test_a_subclass_that_overrides_forward_is_refused_naming_the_registered_type():
    class Odd(TransposedProj):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Odd(4, 4))
    with pytest.raises(UnsupportedModuleError, match=r"a subclass of .*TransposedProj that "
                                                      r"overrides forward\(\)"):
        inject_lora(model, LoRAConfig(r=2, target_modules=["0"]))
    assert not lora_layers(model)


@pytest.mark.parametrize(("base", "lora", "match"), [
    ("not a class", LoRATransposedProj, "base_class must be an nn.Module subclass"),
    (TransposedProj, nn.Linear, "must subclass both LoRALayer and TransposedProj"),
    (nn.Linear, LoRATransposedProj, "must subclass both LoRALayer and Linear"),
])
def test_register_layer_type_refuses_mismatched_classes(base, lora, match):
    with pytest.raises(LayerTypeError, match=match):
        register_layer_type(base, lora)


def test_register_layer_type_names_the_missing_math():
    class Half(LoRALayer, TransposedProj):
        def lora_shapes(self, r):
            return (r, 1), (1, r)

    with pytest.raises(LayerTypeError, match=r"must define \['delta_weight', 'lora_forward'\]"):
        register_layer_type(TransposedProj, Half)
    assert layer_types()[TransposedProj] is LoRATransposedProj  # unchanged
