"""Train a tiny LoRA model with ``LoRACallback``, for ``tests/test_callback_compat.py``.

Run as a script (``python tests/_ddp_worker.py OUT DEVICES``) it trains on ``DEVICES``
CPU processes; with 2 it uses ``strategy="ddp"`` over gloo, and Lightning re-runs this
script for rank 1. Each rank saves its final adapter and base weights to
``OUT.rank<N>.pt``, so pytest never forks Lightning DDP itself.

The global batch is always 8: with DDP each rank takes 4 samples per step from a
``DistributedSampler(shuffle=False)``; rank 0 gets samples 0, 2, 4, ... and rank 1 gets
1, 3, 5, ..., so step k sees samples 8k..8k+7 exactly as one process with batch 8 does.
DDP averages the two per-rank mean gradients, which is the mean over all 8, and plain SGD
turns equal gradients into equal updates.
"""

from __future__ import annotations

import sys

import lightning as L
import torch
import torch.nn.functional as F
from _tiny import TinyNet
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from lora_lightning import LoRACallback, LoRAConfig, adapter_state_dict

GLOBAL_BATCH = 8
STEPS = 4
CONFIG = LoRAConfig(r=2, alpha=4, target_modules=["fc1", "fc2"])
GRADIENT = LoRAConfig(r=2, alpha=4, target_modules=["fc1", "fc2"], init="gradient")


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH * STEPS, 8, generator=g)
    return TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())


class WorkerModule(L.LightningModule):
    """Plain SGD (no momentum), so equal gradients give bit-close updates."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyNet(16)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def train_dataloader(self) -> DataLoader:
        data = dataset()
        world = self.trainer.world_size
        if world == 1:
            return DataLoader(data, batch_size=GLOBAL_BATCH, shuffle=False)
        sampler = DistributedSampler(
            data, num_replicas=world, rank=self.trainer.global_rank, shuffle=False
        )
        return DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


class StartAdapters(L.Callback):
    """The injected, untrained adapters as training starts."""

    def __init__(self) -> None:
        self.adapters: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.adapters = {k: v.detach().clone() for k, v in adapter_state_dict(pl_module).items()}


def train(devices: int, resume: str | None = None, config: LoRAConfig = CONFIG,
          ) -> tuple[WorkerModule, L.Trainer, dict[str, torch.Tensor]]:
    """Train for ``STEPS`` optimizer steps on ``devices`` CPU processes (``STEPS`` more after
    resuming from the checkpoint ``resume``); also return the adapters as they were when
    training started (after the checkpoint was restored, when resuming)."""
    module = WorkerModule()
    start = StartAdapters()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=STEPS * (2 if resume else 1),
        use_distributed_sampler=False,  # the module builds its own DistributedSampler
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[LoRACallback(config, verbose=False), start],
    )
    trainer.fit(module, ckpt_path=resume)
    return module, trainer, start.adapters


def main(out: str, devices: int, mode: str = "") -> None:
    """``mode``: ``save:PATH`` also saves a checkpoint at the end (every rank calls
    ``save_checkpoint``, as Lightning requires); ``resume:PATH`` resumes from one;
    ``gradient`` trains with ``init="gradient"``."""
    torch.set_num_threads(1)
    action, _, path = mode.partition(":")
    module, trainer, start = train(devices, resume=path if action == "resume" else None,
                                   config=GRADIENT if action == "gradient" else CONFIG)
    if action == "save":
        trainer.save_checkpoint(path)
    adapters = adapter_state_dict(module)
    torch.save(
        {
            "start": start,
            "adapters": {k: v.detach().clone() for k, v in adapters.items()},
            "base": {
                k: v.detach().clone() for k, v in module.state_dict().items() if k not in adapters
            },
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
        },
        f"{out}.rank{trainer.global_rank}.pt",
    )
    if torch.distributed.is_initialized():
        # End the gloo group here, both ranks together: left to interpreter exit, its
        # threads were once torn down mid-use ("terminate called without an active
        # exception", SIGABRT) after a resumed run had finished.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:4])
