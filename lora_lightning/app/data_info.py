"""What the app reports about the data beside every result: sizes, classes, the floor.

An accuracy means little without the rate of always predicting the most frequent class
(the *majority-class rate*) and the size of the test split, so the app sets the data up
before the model is built, reads both, and sizes the model's head from the data's
number of classes (``model.net.num_classes: null`` means "from the data").

The app asks only for the methods of :class:`SplitStats`; the example datamodules
(``SplitDataModule``) have them, and so may yours, without importing the examples.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)

# Below this many test samples one sample moves accuracy by over half a point.
SMALL_TEST = 200


@runtime_checkable
class SplitStats(Protocol):
    """A datamodule that can describe its splits after an idempotent ``setup``."""

    def setup(self, stage: str) -> None: ...

    def split_size(self, split: str) -> int | None: ...

    def class_counts(self, split: str) -> dict[int, int] | None: ...

    def majority_rate(self, split: str) -> float | None: ...


def describe_data(datamodule: Any) -> dict[str, Any]:
    """Set up a :class:`SplitStats` datamodule (such as the examples' ``SplitDataModule``)
    and describe its splits.

    Returns ``num_classes``, ``label_names``, ``train_size``, ``val_size``, ``test_size``,
    ``test_class_counts`` and ``test_majority_acc``; entries a datamodule cannot tell
    (one without the :class:`SplitStats` methods, set up only by the Trainer) are None.
    """
    info: dict[str, Any] = dict.fromkeys(
        ("num_classes", "label_names", "train_size", "val_size", "test_size",
         "test_class_counts", "test_majority_acc"))
    if isinstance(datamodule, SplitStats):
        datamodule.setup("fit")
        for split in ("train", "val", "test"):
            info[f"{split}_size"] = datamodule.split_size(split)
        counts = datamodule.class_counts("test")
        info["test_class_counts"] = {str(k): v for k, v in counts.items()} if counts else None
        info["test_majority_acc"] = datamodule.majority_rate("test")
    try:
        num_classes = getattr(datamodule, "num_classes", None)
    except RuntimeError:  # a property that needs setup()
        num_classes = None
    info["num_classes"] = int(num_classes) if isinstance(num_classes, int) else None
    names = getattr(datamodule, "label_names", None)
    info["label_names"] = [str(n) for n in names] if names else None
    return info


def small_test_warning(test_size: int | None, majority: float | None) -> str | None:
    """A warning for a test split too small to tell runs apart, or None."""
    if not test_size or test_size >= SMALL_TEST:
        return None
    p = 0.75 if majority is None else max(majority, 0.5)
    spread = 100 * math.sqrt(p * (1 - p) / test_size)
    return (
        f"the test split has only {test_size} samples: one sample moves accuracy by "
        f"{100 / test_size:.1f} points and its standard error is about {spread:.1f} points, "
        "so differences of that size between runs are noise; use a larger test split "
        f"(at least {SMALL_TEST}) to compare runs."
    )
