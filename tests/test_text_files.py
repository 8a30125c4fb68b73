"""TextFilesDataModule: your own CSV/TSV/JSONL/Parquet files, and the errors bad files get."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from lora_lightning.examples import DataFileError, TextFilesDataModule, read_rows

ROWS = [(f"review number {i} " + "very " * (i % 7) + ("good" if i % 3 else "bad"),
         "pos" if i % 3 else "neg") for i in range(60)]


def write(path: Path, rows=ROWS, text="text", label="label") -> Path:
    suffix = path.suffix
    if suffix in (".csv", ".tsv"):
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t" if suffix == ".tsv" else ",")
            writer.writerow([text, label])
            writer.writerows(rows)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps({text: t, label: y}) + "\n" for t, y in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({text: [t for t, _ in rows], label: [y for _, y in rows]}), path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_every_format_reads_the_same_rows(tmp_path, suffix):
    rows = read_rows(write(tmp_path / f"d{suffix}"), ["text", "label"])
    assert [(r["text"], r["label"]) for _, r in rows] == ROWS
    first = rows[0][0]
    assert first == ("row 1" if suffix == ".parquet" else "line 1" if suffix == ".jsonl"
                     else "line 2")  # a CSV's line 1 is its header


def test_datamodule_maps_labels_holds_out_val_and_truncates(tmp_path):
    train = write(tmp_path / "train.csv", text="review", label="stars")
    test = write(tmp_path / "test.jsonl", ROWS[:20], text="review", label="stars")
    dm = TextFilesDataModule(train=str(train), test=str(test), text_column="review",
                             label_column="stars", max_length=6, batch_size=8)
    dm.setup()
    assert dm.label_names == ["neg", "pos"] and dm.num_classes == 2
    assert dm.split_size("train") == 54 and dm.split_size("val") == 6
    assert dm.split_size("test") == 20
    assert dm.class_counts("test") == {0: 7, 1: 13}
    assert dm.majority_rate("test") == pytest.approx(13 / 20)
    batch = next(iter(dm.test_dataloader()))
    assert batch["input_ids"].shape[1] <= 6  # truncated at max_length tokens
    assert batch["labels"].tolist() == [0 if y == "neg" else 1 for _, y in ROWS[:8]]
    assert dm.state_dict() == {"label_names": ["neg", "pos"]}
    again = TextFilesDataModule(train=str(train), text_column="review", label_column="stars")
    again.load_state_dict(dm.state_dict())
    assert again.num_classes == 2


def test_integer_labels_sort_numerically_and_explicit_order_wins(tmp_path):
    rows = [(f"t{i}", str(i % 11)) for i in range(44)]
    dm = TextFilesDataModule(train=str(write(tmp_path / "a.csv", rows)))
    dm.setup()
    assert dm.label_names == [str(i) for i in range(11)]
    dm = TextFilesDataModule(train=str(write(tmp_path / "b.csv")), labels=["pos", "neg"],
                             test=str(write(tmp_path / "c.csv", ROWS[:3])))
    dm.setup()
    assert dm.label_names == ["pos", "neg"]
    assert dm._datasets["test"].labels == [1, 0, 0]  # neg, pos, pos in the given order


@pytest.mark.parametrize(
    ("make", "kwargs", "message"),
    [
        (lambda p: write(p / "t.csv", text="body"), {},
         r"t\.csv: no column 'text'; the columns are \['body', 'label'\]"),
        (lambda p: (p / "t.csv").write_text("text,label\n") and p / "t.csv", {},
         r"t\.csv: the file has no data rows"),
        (lambda p: (p / "t.csv").write_text("") or p / "t.csv", {},
         r"t\.csv: the file has no data rows"),
        (lambda p: write(p / "t.csv", [("a", "x"), ("b", "x")]), {},
         r"t\.csv: every row has the label 'x' \(column 'label'\); a classifier needs at "
         r"least two classes"),
        (lambda p: write(p / "t.csv", [("a", "x"), ("", "y"), ("c", "y")]), {},
         r"t\.csv, line 3: the text \('text'\) is empty"),
        (lambda p: (p / "t.jsonl").write_text('{"text": "a", "label": 1}\n[1]\n') and p / "t.jsonl",
         {}, r"t\.jsonl, line 2: got a JSON list; expected one JSON object a line"),
        (lambda p: write(p / "t.xlsx"), {}, r"unknown file type '\.xlsx'"),
    ],
    ids=["missing-column", "header-only", "empty", "one-class", "empty-text", "not-objects",
         "suffix"],
)
def test_bad_training_files_name_file_and_row(tmp_path, make, kwargs, message):
    dm = TextFilesDataModule(train=str(make(tmp_path)), **kwargs)
    with pytest.raises(DataFileError, match=message):
        dm.setup()


def test_unknown_label_in_test_names_file_line_and_training_labels(tmp_path):
    train = write(tmp_path / "train.csv")
    test = write(tmp_path / "test.csv", [("fine", "pos"), ("meh", "neutral")])
    dm = TextFilesDataModule(train=str(train), test=str(test))
    with pytest.raises(DataFileError) as info:
        dm.setup()
    assert info.value.where == "line 3" and info.value.path == str(test)
    assert "label 'neutral' does not occur in the training file" in str(info.value)
    assert "['neg', 'pos']" in str(info.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data file not found: '.*nope\.csv'"):
        TextFilesDataModule(train=str(tmp_path / "nope.csv")).setup()


def test_checkpoint_with_other_classes_is_refused(tmp_path):
    dm = TextFilesDataModule(train=str(write(tmp_path / "t.csv")))
    dm.setup()
    with pytest.raises(ValueError, match=r"checkpoint's classes are \['a', 'b', 'c'\]"):
        dm.load_state_dict({"label_names": ["a", "b", "c"]})
    assert torch.is_tensor(next(iter(dm.val_dataloader()))["labels"])
