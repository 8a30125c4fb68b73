"""The tiny MLP that the Trainer, DDP, FSDP and reliability tests share, the
LightningModule bodies the Trainer tests mix in, and their data.

Its Linear layers are ``fc1``, ``fc2`` and ``head``, so LoRA targets ``["fc1", "fc2"]``
and ``head`` can be a ``modules_to_save``.
"""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyNet(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class TinyTraining:
    """The LightningModule body that the load tests' modules share (they differ in sizes
    and hooks): ``fc1 -> fc2 -> head``, a cross-entropy step, SGD (lr 0.1) over the tensors
    that require grad. Mix in before ``LightningModule``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


class NetTraining:
    """The LightningModule body that the precision tests' modules share (they differ in
    ``self.net``): ``forward`` is ``self.net``, a cross-entropy step on float32 logits (the
    net may compute in half precision), AdamW (lr 1e-2) over the tensors that require grad.
    Mix in before ``LightningModule``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x).float(), y)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def sign_data() -> DataLoader:
    """32 samples of 8 seeded features labelled by the sign of the first, in batches of 8."""
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)
