"""Real models and real data for the demo, the tests and the Hydra app.

- :mod:`~lora_lightning.examples.text`: Rotten Tomatoes critic snippets (split by movie)
  and an all-MiniLM-L6-v2 classifier with mean pooling.
- :mod:`~lora_lightning.examples.text_files`: your own CSV/TSV/JSONL/Parquet text files.
- :mod:`~lora_lightning.examples.splits`: ``SplitDataModule``, the loaders they share.
- :mod:`~lora_lightning.examples.vision`: scikit-learn's 8x8 digits and a small CNN.
- :mod:`~lora_lightning.examples.module`: a LightningModule that trains either one.

transformers and scikit-learn are imported only when a model or dataset is built.
"""

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
