"""Real models and real data for the demo, the tests and the Hydra app.

- :mod:`~lora_lightning.examples.text`: Rotten Tomatoes critic snippets (split by movie)
  and an all-MiniLM-L6-v2 classifier with mean pooling.
- :mod:`~lora_lightning.examples.text_files`: your own CSV/TSV/JSONL/Parquet text files.
- :mod:`~lora_lightning.examples.splits`: ``SplitDataModule``, the loaders they share.
- :mod:`~lora_lightning.examples.vision`: scikit-learn's 8x8 digits and a small CNN.
- :mod:`~lora_lightning.examples.module`: a LightningModule that trains either one.
- :mod:`~lora_lightning.examples.lm`, ``lm_data``, ``lm_model``, ``lm_export``: causal
  language models (SmolLM2 or any HF causal LM): training with perplexity and
  generations, Hamlet text and instruction JSONL, and export for transformers and PEFT.

transformers and scikit-learn are imported only when a model or dataset is built.
"""

from lora_lightning.examples.lm import CausalLMModule
from lora_lightning.examples.lm_data import (
    InstructionDataModule,
    JsonlFormatError,
    TextDataModule,
    hamlet_dialogue,
    hamlet_path,
    read_jsonl,
)
from lora_lightning.examples.lm_export import LMExport
from lora_lightning.examples.lm_model import (
    ContextLengthError,
    ModelPathError,
    load_causal_lm,
    load_lm_tokenizer,
    smollm2_dir,
)
from lora_lightning.examples.module import ClassifierModule, peak_memory_mb
from lora_lightning.examples.splits import SplitDataModule
from lora_lightning.examples.text import (
    MiniLMClassifier,
    RottenTomatoesDataModule,
    Snippet,
    TokenizedTexts,
    load_minilm_tokenizer,
    load_rotten_tomatoes,
    minilm_path,
    pad_collate,
    rotten_tomatoes_path,
    split_by_movie,
    tokenize_texts,
)
from lora_lightning.examples.text_files import DataFileError, TextFilesDataModule, read_rows
from lora_lightning.examples.vision import DigitsCNN, DigitsDataModule, load_digits_tensors

__all__ = [
    "CausalLMModule",
    "ClassifierModule",
    "ContextLengthError",
    "DataFileError",
    "DigitsCNN",
    "DigitsDataModule",
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
    "MiniLMClassifier",
    "RottenTomatoesDataModule",
    "Snippet",
    "SplitDataModule",
    "TextFilesDataModule",
    "TokenizedTexts",
    "load_digits_tensors",
    "load_minilm_tokenizer",
    "load_rotten_tomatoes",
    "minilm_path",
    "pad_collate",
    "peak_memory_mb",
    "read_rows",
    "rotten_tomatoes_path",
    "split_by_movie",
    "tokenize_texts",
]
