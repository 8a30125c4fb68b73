"""Adapter precision through the Trainer: float32 adapters on a half-precision base, with
Lightning's "bf16-true" (which converts the whole module) and "bf16-mixed" (autocast)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from _tiny import NetTraining, sign_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_lightning import LoRACallback, LoRAConfig, load_lora_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


class Module(NetTraining, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def fit(tmp_path, precision: str, rule: str | None = None) -> tuple[Module, L.Trainer]:
    module = Module()
    cfg = LoRAConfig(r=2, target_modules=["0", "2"], adapter_dtype=rule)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", precision=precision, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[LoRACallback(cfg, verbose=False)])
    trainer.fit(module, sign_data())
    return module, trainer


@pytest.mark.parametrize(("rule", "adapters"), [(None, torch.float32), ("base", torch.bfloat16)])
def test_bf16_true_keeps_float32_adapters_unless_asked(tmp_path, rule, adapters):
    module, trainer = fit(tmp_path, "bf16-true", rule)
    layer = module.net[0]
    assert layer.weight.dtype == torch.bfloat16  # Lightning converted the base
    assert layer.lora_A.dtype == layer.lora_B.dtype == adapters
    assert layer.lora_B.abs().sum() > 0  # trained
    opt_dtypes = {s["exp_avg"].dtype for s in trainer.optimizers[0].state.values()}
    assert adapters in opt_dtypes  # the optimizer state follows the adapters
    path = tmp_path / "bf16.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["state_dict"]
    assert saved["net.0.lora_A"].dtype == adapters and "net.0.weight" not in saved
    # into a base of the dtype it trained on: the fingerprint is of the stored values
    loaded = load_lora_checkpoint(Module().to(torch.bfloat16), path)
    assert loaded.net[0].lora_A.dtype == adapters
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).float(), module.eval()(x).float(), rtol=1e-2,
                                   atol=1e-2)


def test_bf16_mixed_on_a_bf16_base_trains_float32_adapters(tmp_path):
    module = Module().to(torch.bfloat16)
    cfg = LoRAConfig(r=2, target_modules=["0", "2"])
    trainer = L.Trainer(max_steps=4, accelerator="cpu", precision="bf16-mixed", logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[LoRACallback(cfg, verbose=False)])
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(32, 8).bfloat16(),
                                                 torch.randint(0, 2, (32,))), batch_size=8))
    assert module.net[0].weight.dtype == torch.bfloat16
    assert module.net[0].lora_A.dtype == torch.float32
    assert module.net[2].lora_B.abs().sum() > 0


def _fp16_mixed(tmp_path, rule: str | None):
    """A float16 base, fp16 autocast and a GradScaler on CPU. ``precision="16-mixed"`` on
    CPU is turned into "bf16-mixed" by Lightning (with a warning), so the plugin is passed
    as is."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    module = Module().to(torch.float16)
    plugin = MixedPrecision("16-mixed", "cpu")
    cfg = LoRAConfig(r=2, target_modules=["0"], modules_to_save=["2"], adapter_dtype=rule)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", plugins=[plugin], logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[LoRACallback(cfg, verbose=False)])
    return module, plugin, trainer


def test_16_mixed_with_its_grad_scaler_trains_float32_adapters_on_a_float16_base(tmp_path):
    module, plugin, trainer = _fp16_mixed(tmp_path, None)
    head = module.net[2].weight.detach().clone()
    trainer.fit(module, sign_data())
    assert plugin.scaler is not None and plugin.scaler._scale is not None  # it scaled
    assert module.net[0].weight.dtype == torch.float16
    assert module.net[0].lora_A.dtype == module.net[2].weight.dtype == torch.float32
    assert module.net[0].lora_B.abs().sum() > 0
    assert not torch.equal(module.net[2].weight.detach(), head.float())


def test_16_mixed_refuses_float16_adapters_naming_the_fix(tmp_path):
    from lora_lightning.errors import ConfigError

    module, _, trainer = _fp16_mixed(tmp_path, "base")
    with pytest.raises(ConfigError, match=r"GradScaler.*net\.0\.lora_A.*adapter_dtype=None"):
        trainer.fit(module, sign_data())
