"""``SplitDataModule``: the classification examples' datamodule base.

It adds to :class:`~lora_lightning.examples.common.BaseDataModule` (loaders, seeded
shuffling) what the app reads against every accuracy: a dataset that has a ``labels``
attribute (a list or a 1-D tensor of class indices) gets class counts and a majority-class
rate per split (:meth:`~SplitDataModule.class_counts`,
:meth:`~SplitDataModule.majority_rate`).
"""

from __future__ import annotations

from collections import Counter

import torch

from ..common import BaseDataModule


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
