"""``SweepReport``: the Hydra callback that summarises a sweep when it ends."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from typing_extensions import override

from lora_lightning.app.report import ReportError, summary_text, write_report

log = logging.getLogger(__name__)


class SweepReport(Callback):
    """After a multirun: write sweep.csv/md/png into the sweep dir and print the table.

    Runs on the machine that launched the sweep (for joblib, submitit and the basic
    launcher alike), after every job has returned. A sweep whose jobs all failed gets a
    warning, not a second error.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    @override
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            report = write_report(sweep_dir, title=str(config.get("name", "")) or None)
        except ReportError as err:
            log.warning("No sweep report: %s", err)
            return
        print(summary_text(report), flush=True)
