"""``LoRACallback`` on a CUDA GPU: FSDP (``use_orig_params=True``) and bf16 autocast.

Skipped without a GPU, so CPU-only CI collects and skips it. One GPU is enough: FSDP
then runs with a world size of 1, in this process.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _tiny import TinyNet
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from lora_lightning import LoRACallback, LoRAConfig, load_lora_checkpoint

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 1,
    reason="needs a CUDA GPU",
)

CONFIG = LoRAConfig(r=2, alpha=4, target_modules=["fc1", "fc2"])
ADAPTER_KEYS = {f"net.{m}.{p}" for m in ("fc1", "fc2") for p in ("lora_A", "lora_B")}


class GpuModule(L.LightningModule):
    """Seeded, so every instance has the same base weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyNet(32)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x).float(), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


class Recorder(Callback):
    """Adapters at train start (on the CPU) and every training loss."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.losses: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = {
            k: v.detach().float().cpu().clone()
            for k, v in pl_module.state_dict().items() if k in ADAPTER_KEYS
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 8, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long()), batch_size=8)


def _trainer(tmp_path, strategy, precision, recorder) -> L.Trainer:
    return L.Trainer(
        accelerator="cuda",
        devices=1,
        strategy=strategy,
        precision=precision,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[LoRACallback(CONFIG, verbose=False), recorder],
    )


def _base() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in GpuModule().state_dict().items()}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fsdp_trains_adapters_and_saves_an_adapter_only_checkpoint(tmp_path, precision):
    base = _base()
    recorder = Recorder()
    trainer = _trainer(tmp_path, FSDPStrategy(use_orig_params=True), precision, recorder)
    trainer.fit(GpuModule(), _loader())
    assert trainer.global_step == 3
    assert len(recorder.losses) == 3 and all(math.isfinite(v) for v in recorder.losses)

    path = tmp_path / "fsdp.ckpt"
    trainer.save_checkpoint(path)
    raw = torch.load(path, map_location="cpu", weights_only=False)
    assert set(raw["state_dict"]) == ADAPTER_KEYS
    assert raw["lora_lightning"]["mode"] == "adapter"
    for key in ADAPTER_KEYS:
        assert raw["state_dict"][key].dtype == torch.float32
        assert not torch.equal(raw["state_dict"][key].float(), recorder.start[key]), key

    loaded = load_lora_checkpoint(GpuModule, path)
    state = loaded.state_dict()
    for key, value in base.items():
        assert torch.equal(state[key], value), f"frozen base tensor {key} changed"
    for key in ADAPTER_KEYS:
        assert torch.equal(state[key], raw["state_dict"][key])


def test_bf16_mixed_on_gpu_keeps_float32_adapters_and_frozen_base(tmp_path):
    base = _base()
    module = GpuModule()
    out_dtypes: list[torch.dtype] = []
    module.net.head.register_forward_hook(lambda m, i, out: out_dtypes.append(out.dtype))
    recorder = Recorder()
    _trainer(tmp_path, "auto", "bf16-mixed", recorder).fit(module, _loader())

    assert set(out_dtypes) == {torch.bfloat16}
    assert len(recorder.losses) == 3 and all(math.isfinite(v) for v in recorder.losses)
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    for key in ADAPTER_KEYS:
        assert state[key].dtype == torch.float32
        assert not torch.equal(state[key], recorder.start[key]), key
    for key, value in base.items():
        assert torch.equal(state[key], value), f"frozen base tensor {key} changed"
