"""The data-module base every example uses, and ``SplitDataModule`` for classification.

:class:`BaseDataModule` is the train/val/test loader plumbing, shared by the classification
data (through :class:`SplitDataModule`) and the causal-LM data. Subclasses fill
``self._datasets`` (``{"train", "val", "test"} -> Dataset``) in ``setup`` and may override
:meth:`~BaseDataModule.collate_fn` and :meth:`~BaseDataModule.batch_sampler`. Loader
settings are constructor arguments (``batch_size``, ``num_workers``, ``shuffle_seed``); a
subclass that calls ``super().__init__()`` without them and saves them with
``save_hyperparameters()`` (the older form) still works, and one that does neither gets an
error naming the setting.

One rule seeds the training shuffle: ``shuffle_seed`` if given, else the run's global seed
(``torch.initial_seed()``, which ``lightning.seed_everything(seed)`` sets). One generator,
seeded so when the first training loader is built, serves the datamodule's life (a loader
built again continues its stream); a batch sampler (length-bucketed LM batches) is given
the same seed. So ``seed=1`` reshuffles while a split fixed by the datamodule's own
``seed`` stays the same. Pass ``shuffle_seed`` to pin it.

:class:`SplitDataModule` adds what the app reads against every accuracy: a dataset that
has a ``labels`` attribute (a list or a 1-D tensor of class indices) gets class counts and
a majority-class rate per split (:meth:`~SplitDataModule.class_counts`,
:meth:`~SplitDataModule.majority_rate`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from typing_extensions import override

_UNSET = object()


def check_int(name: str, value: object, low: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Expected `{name}` to be an int >= {low} but got {value!r}.")


class BaseDataModule(L.LightningDataModule):
    """Base class: three named splits, seeded shuffling, a clear error before ``setup``.

    Args:
        batch_size: samples per batch (every split).
        num_workers: DataLoader worker processes.
        shuffle_seed: seed of the training shuffle; None (default) takes it from the
            global seed (``torch.initial_seed()``, set by ``seed_everything``).
    """

    def __init__(
        self,
        batch_size: int | None = None,
        num_workers: int | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size is not None:
            check_int("batch_size", batch_size, 1)
        if num_workers is not None:
            check_int("num_workers", num_workers, 0)
        if shuffle_seed is not None:
            check_int("shuffle_seed", shuffle_seed, 0)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_seed = shuffle_seed
        self._datasets: dict[str, Dataset] | None = None
        self._generator: torch.Generator | None = None

    @property
    def datasets(self) -> dict[str, Dataset] | None:
        """``{"train", "val", "test"} -> Dataset`` after ``setup``; None before."""
        return self._datasets

    def collate_fn(self) -> Callable[[list[Any]], Any] | None:
        """The DataLoader's ``collate_fn``; None means PyTorch's default."""
        return None

    def batch_sampler(self, name: str, seed: int) -> Sampler | None:
        """A batch sampler for split ``name`` (``seed``: the training shuffle's seed), or
        None (the default) for plain batches of ``batch_size``, shuffled for training."""
        return None

    def shuffle_seed_in_use(self) -> int:
        """The training shuffle's seed: ``shuffle_seed``, else ``torch.initial_seed()``."""
        return torch.initial_seed() if self.shuffle_seed is None else self.shuffle_seed

    def _setting(self, name: str, default: Any = _UNSET) -> Any:
        """A loader setting: the constructor argument, else a saved hparam, else default."""
        value = getattr(self, name, None)
        if value is None:
            value = self.hparams.get(name) if hasattr(self, "hparams") else None
        if value is None:
            if default is _UNSET:
                raise RuntimeError(
                    f"{type(self).__name__} has no `{name}`: pass {name}=... to "
                    f"BaseDataModule.__init__ (e.g. super().__init__({name}=32))."
                )
            return default
        return value

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        if self._datasets is None:
            raise RuntimeError(
                f"{type(self).__name__}.{name}_dataloader() was called before setup(); "
                "call dm.setup() first or pass the datamodule to a Trainer."
            )
        common = {"num_workers": self._setting("num_workers", 0), "collate_fn": self.collate_fn()}
        sampler = self.batch_sampler(name, self.shuffle_seed_in_use())
        if sampler is not None:
            return DataLoader(self._datasets[name], batch_sampler=sampler, **common)
        if shuffle and self._generator is None:
            self._generator = torch.Generator().manual_seed(self.shuffle_seed_in_use())
        return DataLoader(
            self._datasets[name],
            batch_size=self._setting("batch_size"),
            shuffle=shuffle,
            generator=self._generator if shuffle else None,
            **common,
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

    def split_size(self, split: str) -> int | None:
        """Number of samples in one split after ``setup``; None if unknown."""
        if self._datasets is None or split not in self._datasets:
            return None
        return len(self._datasets[split])  # type: ignore[arg-type]


class SplitDataModule(BaseDataModule):
    """:class:`BaseDataModule` for classification: class counts and the majority-class
    rate of each split, for datasets with a ``labels`` attribute. Arguments as for
    :class:`BaseDataModule`.
    """

    def class_counts(self, split: str) -> dict[int, int] | None:
        """``{class index: count}`` of one split after ``setup``; None if unknown."""
        if self._datasets is None or split not in self._datasets:
            return None
        labels = getattr(self._datasets[split], "labels", None)
        if labels is None:
            return None
        if isinstance(labels, torch.Tensor):
            labels = labels.tolist()
        return dict(sorted(Counter(int(label) for label in labels).items()))

    def majority_rate(self, split: str) -> float | None:
        """Accuracy of always predicting the split's most frequent class; None if unknown."""
        counts = self.class_counts(split)
        if not counts:
            return None
        return max(counts.values()) / sum(counts.values())
