"""Mixed precision on a CUDA GPU (issue 19, item 5): ``precision="16-mixed"`` (fp16
autocast with a GradScaler, which Lightning offers on GPUs only) and ``"bf16-true"`` with
float32 adapters and ``modules_to_save`` on a half-precision base. Skipped without a GPU;
the CPU side is ``tests/test_precision.py``."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _tiny import TinyNet
from torch.utils.data import DataLoader, TensorDataset

from lora_lightning import LoRACallback, LoRAConfig, load_lora_checkpoint
from lora_lightning.errors import ConfigError

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyNet(32)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x).float(), y)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def data() -> DataLoader:
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16)


def fit(tmp_path, precision: str, rule: str | None, base=torch.float16, **kw):
    module = Module().to(base)
    cfg = LoRAConfig(r=4, target_modules=["fc1", "fc2"], modules_to_save=["head"],
                     adapter_dtype=rule)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision=precision, max_epochs=2,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[LoRACallback(cfg, verbose=False)], **kw)
    trainer.fit(module, data())
    return module, trainer


def test_16_mixed_trains_float32_adapters_and_head_on_a_float16_base(tmp_path):
    module, trainer = fit(tmp_path, "16-mixed", None)
    scaler = trainer.precision_plugin.scaler
    assert scaler is not None and scaler._scale is not None  # the GradScaler ran
    net = module.net
    assert net.fc1.weight.dtype == torch.float16
    assert net.fc1.lora_A.dtype == net.head.weight.dtype == torch.float32
    assert net.fc1.lora_B.abs().sum() > 0
    path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_lora_checkpoint(Module().to(torch.float16), path).cuda()
    x = torch.randn(8, 8, device="cuda", dtype=torch.float16)
    with torch.no_grad():  # the same values on the same device (fit ends on the CPU)
        torch.testing.assert_close(loaded(x).float(), module.eval().cuda()(x).float(),
                                   rtol=1e-3, atol=1e-3)


def test_16_mixed_refuses_float16_adapters_naming_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="GradScaler"):
        fit(tmp_path, "16-mixed", "base")


def test_bf16_true_keeps_float32_adapters_and_head(tmp_path):
    module, _ = fit(tmp_path, "bf16-true", None, base=torch.float32)
    net = module.net
    assert net.fc1.weight.dtype == torch.bfloat16
    assert net.fc1.lora_A.dtype == net.head.weight.dtype == torch.float32
