"""The tiny MLP that the Trainer, DDP, FSDP and reliability tests share.

Its Linear layers are ``fc1``, ``fc2`` and ``head``, so LoRA targets ``["fc1", "fc2"]``
and ``head`` can be a ``modules_to_save``.
"""

import torch
from torch import nn


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
