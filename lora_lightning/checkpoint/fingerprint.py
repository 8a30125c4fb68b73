"""A cheap fingerprint of a model's frozen base weights, to tell base models apart."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..quantize import dense_summaries, tensor_summary
from ..registry import canonical_name, param_keys
from .adapter_state import adapter_keys


def base_fingerprint(model: nn.Module, adapter: str | None = None,
                     rounded_to: torch.dtype | None = None) -> dict[str, object]:
    """Shapes plus a cheap content hash of the frozen base parameters (not buffers,
    which training may change).

    Reads at most 4,096 evenly spaced values per tensor
    (:func:`~lora_lightning.quantize.tensor_summary`), so it costs milliseconds even for
    large models. Take it while the adapters are not merged. A base that ``quantize_base``
    quantized counts with its dense weights from before (kept as a summary), so a QLoRA
    checkpoint names the pretrained base, which is quantized again on load.
    ``rounded_to``: of the float32 base values as that dtype would hold them (a run in
    ``precision="bf16-true"`` saves the fingerprint of its bfloat16 base; the Trainer
    restores the checkpoint before it converts the model).
    """
    excluded = set(adapter_keys(model, adapter))  # other adapters count as base here
    digest = hashlib.sha256()
    n = 0
    names = param_keys(model)
    dense = dense_summaries(model)
    for name, value in model.named_parameters():
        key = names.get(name, name)
        if key in excluded:
            continue
        key = canonical_name(key)  # a wrapped model and its plain form agree
        rounded = rounded_to if value.dtype == torch.float32 else None
        summary = dense.get(id(value)) or tensor_summary(value, rounded)
        digest.update(f"{key}:{summary}".encode())
        n += 1
    return {"tensors": n, "sha256": digest.hexdigest()}
