"""``TextFilesDataModule``: text classification from your own CSV, TSV, JSONL or Parquet files.

::

    lora-lightning data=text_files data.train=reviews.csv data.test=reviews_test.csv \\
        data.text_column=review data.label_column=stars

- The format comes from the file's suffix: ``.csv``, ``.tsv``, ``.jsonl`` (one JSON
  object a line; ``.ndjson`` too) or ``.parquet`` (needs ``pyarrow``).
- Labels may be any strings or integers. The label names are the training file's
  distinct labels, sorted (or ``labels=[...]`` in your order); class ``i`` is
  ``label_names[i]``. They are saved in every checkpoint (the datamodule's state dict)
  and in the app's ``result.json``.
- Without ``val``, a ``val_fraction`` of the training rows (drawn with ``seed``) is held
  out for validation.
- Texts are tokenized with the MiniLM tokenizer (or the one at ``model_path``) and
  truncated at ``max_length`` tokens.

A bad file stops ``setup`` with a :class:`DataFileError` naming the file, the line (or
Parquet row) and what would work: a missing column, an empty file, an empty text or
label, a training file with one class only, a label in the test file that the training
file never has.
"""

from __future__ import annotations

import csv
import functools
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from typing_extensions import override

from ..common import check_int
from .splits import SplitDataModule
from .text import TokenizedTexts, load_minilm_tokenizer, pad_collate, tokenize_texts

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
           ".parquet": "parquet"}
PYARROW_INSTALL = "pip install pyarrow"


class DataFileError(ValueError):
    """A data file that cannot be used as it is.

    Attributes:
        path: the file.
        where: ``"line 12"`` / ``"row 12"`` (1-based), or ``""`` for the whole file.
        problem: what is wrong and what would work.
    """

    def __init__(self, path: str | Path, where: str, problem: str) -> None:
        self.path, self.where, self.problem = str(path), where, problem
        super().__init__(f"{self.path}{', ' + where if where else ''}: {problem}")


def read_rows(path: str | Path, columns: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """``[(where, row), ...]`` of a CSV/TSV/JSONL/Parquet file; ``where`` names the line.

    Raises:
        FileNotFoundError: no such file.
        DataFileError: an unknown suffix, no rows, a missing column, a line that is not
            JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {str(path)!r}")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataFileError(
            path, "", f"unknown file type {path.suffix!r}; expected one of {sorted(FORMATS)}."
        )
    if kind in ("csv", "tsv"):
        rows, found = _read_delimited(path, "\t" if kind == "tsv" else ",")
    elif kind == "jsonl":
        rows, found = _read_jsonl(path)
    else:
        rows, found = _read_parquet(path)
    if not rows:
        raise DataFileError(path, "", "the file has no data rows; expected a header "
                            "(or named fields) and at least one row.")
    for column in columns:
        if column not in found:
            raise DataFileError(
                path, rows[0][0] if kind == "jsonl" else "",
                f"no column {column!r}; the columns are {sorted(found)}. Name the right one "
                "with data.text_column=... / data.label_column=...",
            )
    return rows


def _read_delimited(path: Path, delimiter: str) -> tuple[list, set[str]]:
    rows = []
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        for row in reader:
            rows.append((f"line {reader.line_num}", row))
        return rows, set(reader.fieldnames or ())


def _read_jsonl(path: Path) -> tuple[list, set[str]]:
    rows, found = [], set()
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFileError(path, f"line {number}", f"not valid JSON ({err.msg}); "
                                    "expected one JSON object a line.") from err
            if not isinstance(row, dict):
                raise DataFileError(path, f"line {number}", f"got a JSON {type(row).__name__}; "
                                    "expected one JSON object a line.")
            found.update(row)
            rows.append((f"line {number}", row))
    return rows, found


def _read_parquet(path: Path) -> tuple[list, set[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ModuleNotFoundError(
            f"Reading {path} needs pyarrow, which is not installed. Install it: "
            f"`{PYARROW_INSTALL}`."
        ) from err
    table = pq.read_table(path)
    rows = [(f"row {i}", row) for i, row in enumerate(table.to_pylist(), start=1)]
    return rows, set(table.column_names)


def _label_text(value: Any) -> str | None:
    """A label as text (``1`` and ``"1"`` are one class); None when empty."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _sort_key(name: str) -> tuple:
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


class TextFilesDataModule(SplitDataModule):
    """Text classification data from your files, tokenized for the MiniLM example model.

    Args:
        train: the training file (``.csv``, ``.tsv``, ``.jsonl`` or ``.parquet``).
        test: the test file; None to have no test split.
        val: the validation file; None holds out ``val_fraction`` of ``train``.
        text_column: the column holding the text.
        label_column: the column holding the label (a string or an integer).
        labels: the label names in class order; None sorts the training labels.
        val_fraction: share of ``train`` held out for validation when ``val`` is None.
        max_length: tokens per text at most (longer texts are truncated).
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        seed: fixes the validation hold-out (the training shuffle follows the global seed).
        model_path: the tokenizer's folder; None uses the bundled MiniLM.
    """

    def __init__(
        self,
        train: str | Path,
        test: str | Path | None = None,
        val: str | Path | None = None,
        text_column: str = "text",
        label_column: str = "label",
        labels: Sequence[str] | None = None,
        val_fraction: float = 0.1,
        max_length: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        model_path: str | Path | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        check_int("max_length", max_length, 2)
        check_int("seed", seed, 0)
        if not train:
            raise ValueError("Expected `train` to be a file path but got nothing; set "
                             "data.train=path/to/train.csv.")
        if val is None and not 0.0 < val_fraction < 1.0:
            raise ValueError(f"Expected `val_fraction` in (0, 1) but got {val_fraction!r}.")
        self.save_hyperparameters()
        self.label_names: list[str] | None = list(map(str, labels)) if labels else None
        self._pad_id = 0

    @property
    def num_classes(self) -> int:
        """Number of classes: from ``labels`` or, after ``setup``, the training file."""
        if self.label_names is None:
            raise RuntimeError(
                "TextFilesDataModule.num_classes is known after setup() (it comes from the "
                "training file); call dm.setup() first."
            )
        return len(self.label_names)

    def _examples(self, path: str | Path) -> list[tuple[str, str, str]]:
        """``[(where, text, label name), ...]``, every text and label non-empty."""
        hp = self.hparams
        out = []
        for where, row in read_rows(path, [hp.text_column, hp.label_column]):
            text, label = row.get(hp.text_column), _label_text(row.get(hp.label_column))
            if text is None or not str(text).strip():
                raise DataFileError(path, where, f"the text ({hp.text_column!r}) is empty; "
                                    "remove the row or fill it in.")
            if label is None:
                raise DataFileError(path, where, f"the label ({hp.label_column!r}) is empty; "
                                    "every row needs one.")
            out.append((where, str(text), label))
        return out

    def _indices(self, path: str | Path, examples: list[tuple[str, str, str]],
                 index: dict[str, int], train_path: str | Path) -> list[int]:
        out = []
        for where, _, label in examples:
            if label not in index:
                raise DataFileError(
                    path, where,
                    f"label {label!r} does not occur in the training file {str(train_path)!r}, "
                    f"whose labels are {list(index)}; a model cannot learn a class it never sees."
                    if str(path) != str(train_path) else
                    f"label {label!r} is not one of data.labels={list(index)}.",
                )
            out.append(index[label])
        return out

    @override
    def setup(self, stage: str | None = None) -> None:
        if self._datasets is not None:
            return
        hp = self.hparams
        train = self._examples(hp.train)
        if self.label_names is None:
            names = sorted({label for _, _, label in train}, key=_sort_key)
            if len(names) < 2:
                raise DataFileError(
                    hp.train, "", f"every row has the label {names[0]!r} (column "
                    f"{hp.label_column!r}); a classifier needs at least two classes.",
                )
            self.label_names = names
        index = {name: i for i, name in enumerate(self.label_names)}
        parts = {"train": (hp.train, train)}
        if hp.val is not None:
            parts["val"] = (hp.val, self._examples(hp.val))
        else:
            order = list(range(len(train)))
            random.Random(hp.seed).shuffle(order)
            n_val = max(1, round(len(train) * hp.val_fraction))
            if n_val >= len(train):
                raise DataFileError(
                    hp.train, "", f"{len(train)} rows cannot give both a training and a "
                    f"validation split (val_fraction={hp.val_fraction}); add rows or pass "
                    "data.val=... .",
                )
            held = set(order[:n_val])
            parts["val"] = (hp.train, [e for i, e in enumerate(train) if i in held])
            parts["train"] = (hp.train, [e for i, e in enumerate(train) if i not in held])
        if hp.test is not None:
            parts["test"] = (hp.test, self._examples(hp.test))
        tokenizer = load_minilm_tokenizer(hp.model_path)
        self._pad_id = tokenizer.pad_token_id
        datasets: dict[str, TokenizedTexts] = {}
        for name, (path, examples) in parts.items():
            labels = self._indices(path, examples, index, hp.train)
            datasets[name] = tokenize_texts(
                tokenizer, [text for _, text, _ in examples], labels, hp.max_length
            )
        datasets.setdefault("test", TokenizedTexts([], []))
        self._datasets = datasets

    @override
    def collate_fn(self):
        return functools.partial(pad_collate, pad_id=self._pad_id)

    @override
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the label names, in class order."""
        return {"label_names": self.label_names}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("label_names")
        if saved and self.label_names and list(saved) != list(self.label_names):
            raise ValueError(
                f"the checkpoint's classes are {list(saved)} but the data's are "
                f"{self.label_names}; pass data.labels={list(saved)} to keep its class order."
            )
        if saved:
            self.label_names = list(saved)
