"""A LightningCLI script over the test-only TinyModule/TinyData (run by test_lightning_cli.py).

After ``fit`` it prints one JSON line: the LoRA callbacks the CLI built, with their config,
and the model's trainable and total parameter counts.
"""

from __future__ import annotations

import json

from _custom_module import TinyData, TinyModule
from lightning.pytorch.cli import LightningCLI

from lora_lightning import LoRACallback, count_parameters


class ReportingCLI(LightningCLI):
    def after_fit(self) -> None:
        loras = [cb for cb in self.trainer.callbacks if isinstance(cb, LoRACallback)]
        counts = count_parameters(self.model)
        print("CLI-RESULT " + json.dumps({
            "lora": [cb.config.to_dict() for cb in loras],
            "injected": [sorted(cb.report.injected) for cb in loras if cb.report],
            "trainable": counts.trainable, "total": counts.total,
            "steps": self.trainer.global_step,
        }), flush=True)


if __name__ == "__main__":
    ReportingCLI(TinyModule, TinyData)
