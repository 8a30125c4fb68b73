"""The module the committed single-adapter fixtures were made with (tests/fixtures/)."""

import lightning as L
import torch
from torch import nn


class FixtureModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 6)
        self.fc1 = nn.Linear(6, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, tokens):
        return self.head(torch.relu(self.fc1(self.emb(tokens).mean(1))))

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=0.05)
