"""The Hydra app's pieces: what ``lora_lightning.train`` builds around a Trainer.

- :class:`HeadOnly`: a Lightning callback that trains only named modules (the floor).
- :class:`LastStepValidation`: a Lightning callback that validates a run that ends at
  ``trainer.max_steps`` mid-epoch, so it has a best checkpoint.
- :class:`RunRecorder`: a Lightning callback that measures one run and logs the same
  ``lora/*`` tags and hparams for runs with and without LoRA.
- :mod:`~lora_lightning.app.report`: sweep tables and plots from ``result.json`` files
  (``python -m lora_lightning.app.report <sweep_dir>``); :mod:`~lora_lightning.app.lm_report`,
  the causal-LM runs' table (perplexity, exports, generations).
- :mod:`~lora_lightning.app.hydra_callbacks`: the Hydra callback that runs the report.
- :mod:`~lora_lightning.app.errors`: one-paragraph errors for bad configs.
- :mod:`~lora_lightning.app.curves`: validation curves from TensorBoard event files.
- :mod:`~lora_lightning.app.final_values`: the compared numbers as a table and bar charts
  that no chart smoothing moves (TensorBoard's Text and Images, run ``comparison``).
- :mod:`~lora_lightning.app.lr_range`: the LR range test's raw losses and the app's
  suggestion from them (``lr_find.enabled=true``).

Only this subpackage and ``lora_lightning.train`` import Hydra; the core never does. The
app and ``lora_lightning.examples`` never import each other (``train`` joins them).
"""

from lora_lightning.app.head_only import HeadOnly
from lora_lightning.app.last_step_validation import LastStepValidation
from lora_lightning.app.recorder import RunRecorder

__all__ = ["HeadOnly", "LastStepValidation", "RunRecorder"]
