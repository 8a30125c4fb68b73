"""``SplitDataModule``: the train/val/test loader plumbing the example datamodules share.

Subclasses fill ``self._datasets`` (``{"train", "val", "test"} -> Dataset``) in ``setup``
and may override :meth:`collate_fn`. Training batches are shuffled with a generator seeded
from ``hparams.seed``, so runs repeat exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override


def check_int(name: str, value: object, low: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Expected `{name}` to be an int >= {low} but got {value!r}.")


class SplitDataModule(L.LightningDataModule):
    """Base class: three named splits, seeded shuffling, a clear error before ``setup``."""

    def __init__(self) -> None:
        super().__init__()
        self._datasets: dict[str, Dataset] | None = None
        self._generator: torch.Generator | None = None

    def collate_fn(self) -> Callable[[list[Any]], Any] | None:
        """The DataLoader's ``collate_fn``; None means PyTorch's default."""
        return None

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        if self._datasets is None:
            raise RuntimeError(
                f"{type(self).__name__}.{name}_dataloader() was called before setup(); "
                "call dm.setup() first or pass the datamodule to a Trainer."
            )
        if shuffle and self._generator is None:
            self._generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(
            self._datasets[name],
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            generator=self._generator if shuffle else None,
            num_workers=self.hparams.num_workers,
            collate_fn=self.collate_fn(),
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
