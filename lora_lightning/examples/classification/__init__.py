"""Classification examples: text (Rotten Tomatoes, your own files) and the digits CNN.

- :mod:`~lora_lightning.examples.classification.text`: Rotten Tomatoes critic snippets
  (split by movie) and an all-MiniLM-L6-v2 classifier with mean pooling.
- :mod:`~lora_lightning.examples.classification.text_files`: your own
  CSV/TSV/JSONL/Parquet text files.
- :mod:`~lora_lightning.examples.classification.vision`: scikit-learn's 8x8 digits and a
  small CNN.
- :mod:`~lora_lightning.examples.classification.splits`: ``SplitDataModule``, the base of
  these datamodules (class counts and the majority-class rate of each split).
- :mod:`~lora_lightning.examples.classification.module`: ``ClassifierModule``, the
  LightningModule that trains any of the classifiers.
"""

from .module import ClassifierModule, peak_memory_mb
from .splits import SplitDataModule
from .text import (
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
from .text_files import DataFileError, TextFilesDataModule, read_rows
from .vision import DigitsCNN, DigitsDataModule, load_digits_tensors

__all__ = [
    "ClassifierModule",
    "DataFileError",
    "DigitsCNN",
    "DigitsDataModule",
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
