"""Real models and real data for the demo, the tests and the Hydra app.

Two families, by concept, on a few shared pieces:

- :mod:`~lora_lightning.examples.classification`: Rotten Tomatoes critic snippets and a
  MiniLM classifier, your own CSV/TSV/JSONL/Parquet text files, scikit-learn's digits and
  a small CNN, ``SplitDataModule`` and the ``ClassifierModule`` that trains them.
- :mod:`~lora_lightning.examples.language`: causal language models (SmolLM2 or any HF
  causal LM): training with perplexity and generations, *Hamlet* text and instruction
  JSONL, and export for transformers and PEFT.
- :mod:`~lora_lightning.examples.common`: ``BaseDataModule`` (the loaders and the one
  shuffle-seeding rule of every example datamodule), the optimizer, the data files.

The examples use the library only through ``from lora_lightning import ...`` and never
import ``lora_lightning.app``. transformers and scikit-learn are imported only when a
model or dataset is built. Every public name is importable from here (``LMExport`` is
imported on first use, so ``python -m lora_lightning.examples.language.export`` runs without
runpy's warning about a module imported twice).
"""

from lora_lightning.examples import language
from lora_lightning.examples.classification import (
    ClassifierModule,
    DataFileError,
    DigitsCNN,
    DigitsDataModule,
    MiniLMClassifier,
    RottenTomatoesDataModule,
    Snippet,
    SplitDataModule,
    TextFilesDataModule,
    TokenizedTexts,
    load_digits_tensors,
    load_minilm_tokenizer,
    load_rotten_tomatoes,
    minilm_path,
    pad_collate,
    peak_memory_mb,
    read_rows,
    rotten_tomatoes_path,
    split_by_movie,
    tokenize_texts,
)
from lora_lightning.examples.common import BaseDataModule
from lora_lightning.examples.language import (
    CausalLMModule,
    ContextLengthError,
    InstructionDataModule,
    JsonlFormatError,
    ModelPathError,
    TextDataModule,
    hamlet_dialogue,
    hamlet_path,
    load_causal_lm,
    load_lm_tokenizer,
    read_jsonl,
    smollm2_dir,
)

__all__ = [
    "BaseDataModule",
    "CausalLMModule",
    "ClassifierModule",
    "ContextLengthError",
    "DataFileError",
    "DigitsCNN",
    "DigitsDataModule",
    "InstructionDataModule",
    "JsonlFormatError",
    "LMExport",
    "MiniLMClassifier",
    "ModelPathError",
    "RottenTomatoesDataModule",
    "Snippet",
    "SplitDataModule",
    "TextDataModule",
    "TextFilesDataModule",
    "TokenizedTexts",
    "hamlet_dialogue",
    "hamlet_path",
    "load_causal_lm",
    "load_digits_tensors",
    "load_lm_tokenizer",
    "load_minilm_tokenizer",
    "load_rotten_tomatoes",
    "minilm_path",
    "pad_collate",
    "peak_memory_mb",
    "read_jsonl",
    "read_rows",
    "rotten_tomatoes_path",
    "smollm2_dir",
    "split_by_movie",
    "tokenize_texts",
]


def __getattr__(name: str) -> object:
    if name in language._LAZY:  # LMExport: the language package imports it on first use
        return getattr(language, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(language._LAZY))
