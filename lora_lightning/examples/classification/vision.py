"""Vision example: scikit-learn's 8x8 handwritten digits and a small CNN.

``load_digits()`` ships with scikit-learn, so this example runs offline in seconds. The
CNN has Conv2d, BatchNorm2d (whose running statistics are buffers, not parameters)
and Linear layers, so it exercises every layer kind a LoRA plugin must handle::

    (B, 1, 8, 8) ─► conv1 ─► bn1 ─► relu ─► conv2 ─► relu ─► maxpool 2 ─► (B, 32, 4, 4)
                                                              flatten ─► classifier ─► (B, 10)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset
from typing_extensions import override

from .splits import SplitDataModule

SKLEARN_INSTALL = "pip install scikit-learn"


class DigitsCNN(nn.Module):
    """A two-convolution CNN for 1x8x8 digit images.

    Args:
        num_classes: number of output logits, at least 2.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"Expected `num_classes` to be an int >= 2 but got {num_classes!r}.")
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.classifier = nn.Linear(32 * 4 * 4, num_classes)

    @override
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Map ``(batch, 1, 8, 8)`` images to ``(batch, num_classes)`` logits."""
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (1, 8, 8):
            raise ValueError(
                "Expected `pixel_values` of shape (batch, 1, 8, 8) but got "
                f"{tuple(pixel_values.shape)}."
            )
        x = torch.relu(self.bn1(self.conv1(pixel_values)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.classifier(x.flatten(1))


class _Digits(Dataset):
    """Images and labels of one split, served as ``{"pixel_values", "labels"}`` dicts."""

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> None:
        self.pixel_values = pixel_values
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Return all 1,797 digits as ``(N, 1, 8, 8)`` float32 in [0, 1] and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ModuleNotFoundError(
            "The digits example needs scikit-learn, which is not installed. "
            f"Install it: `{SKLEARN_INSTALL}`."
        ) from err
    digits = load_digits()
    pixels = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    return pixels, labels


class DigitsDataModule(SplitDataModule):
    """scikit-learn digits, split at random (fixed by ``seed``) into train/val/test.

    Args:
        batch_size: samples per batch.
        val_fraction: share of the 1,797 images held out for validation.
        test_fraction: share held out for testing.
        num_workers: DataLoader worker processes.
        seed: fixes the split (the training shuffle follows the run's global seed).
    """

    num_classes = 10
    label_names = tuple(str(digit) for digit in range(10))

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"Expected `{name}` in (0, 1) but got {value!r}.")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"`val_fraction` + `test_fraction` = {val_fraction + test_fraction!r} leaves no "
                "training data; keep their sum below 1 (e.g. 0.15 + 0.15)."
            )
        self.save_hyperparameters()
        self._datasets: dict[str, _Digits] | None = None

    @override
    def setup(self, stage: str | None = None) -> None:
        if self._datasets is not None:
            return
        pixels, labels = load_digits_tensors()
        order = torch.randperm(
            len(labels), generator=torch.Generator().manual_seed(self.hparams.seed)
        )
        n_val = round(len(labels) * self.hparams.val_fraction)
        n_test = round(len(labels) * self.hparams.test_fraction)
        parts = {
            "val": order[:n_val],
            "test": order[n_val : n_val + n_test],
            "train": order[n_val + n_test :],
        }
        self._datasets = {name: _Digits(pixels[idx], labels[idx]) for name, idx in parts.items()}

