"""A LightningModule and a DataModule that exist only in the tests.

They show that the app trains a user's own classes through ``_target_`` overrides, with
no change to lora_lightning: put this folder on PYTHONPATH and run, for example::

    lora-lightning ~model +model._target_=_custom_module.TinyModule \\
        ~data +data._target_=_custom_module.TinyData \\
        lora.config.target_modules=[fc1,fc2] lora.config.modules_to_save=[head]
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyModule(L.LightningModule):
    """A two-layer MLP on 8 features; logs val/acc (the checkpoint monitors it) and test/acc."""

    def __init__(self, hidden: int = 16, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.fc1 = nn.Linear(8, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}/loss", loss)
        if stage != "train":
            self.log(f"{stage}/acc", (logits.argmax(-1) == y).float().mean())
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.Adam(
            [p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr
        )


class TinyData(L.LightningDataModule):
    """A separable two-class problem: the label is the sign of the first feature."""

    def __init__(self, n: int = 256, batch_size: int = 32) -> None:
        super().__init__()
        self.n = n
        self.batch_size = batch_size

    def setup(self, stage: str | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.n, 8, generator=g)
        self.dataset = TensorDataset(x, (x[:, 0] > 0).long())

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size)
