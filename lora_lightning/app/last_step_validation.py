"""``LastStepValidation``: a run that ends at ``max_steps`` validates at its last step.

Lightning validates at the end of an epoch (or every ``val_check_interval``); a run cut
short by ``trainer.max_steps`` mid-epoch, such as a quick ``trainer.max_steps=20``, would
end without a validation, so without a best checkpoint, and its test would use the last
weights while the table says "the checkpoint with the best validation accuracy". At the
step that reaches ``max_steps`` this callback asks the Trainer to stop
(``trainer.should_stop``, as ``EarlyStopping`` does), and Lightning validates before a
requested stop, so the run ends with a validation and its checkpoint.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override


class LastStepValidation(Callback):
    """Validate at the step that reaches ``trainer.max_steps`` (no effect without one)."""

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True
