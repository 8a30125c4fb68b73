"""Tiny served models for the server's tests and load test: a BERT classifier or a Llama
causal LM saved with ``save_pretrained`` (with the small BPE tokenizer of ``_tiny_lm``), and
a folder of adapters for it, each with random values (as if trained) and its own rank."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_lightning import LoRAConfig, inject_lora, save_adapter
from tests._helpers import randomize_adapters
from tests._tiny_lm import make_tiny_lm, make_tokenizer


def make_tiny_classifier(folder: Path, seed: int = 0, hidden: int = 32, layers: int = 2
                         ) -> Path:
    """A BERT (2 layers of hidden 32 unless told) with a 3-label head and its tokenizer, in
    ``folder``."""
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = make_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=2 * hidden,
                        max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                        num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"},
                        label2id={"neg": 0, "neu": 1, "pos": 2}, initializer_range=0.3)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def make_adapters(model_folder: Path, out: Path, names: list[str], task: str,
                  seed: int = 1, rank: int | None = None,
                  labels: dict[str, list[str]] | None = None) -> dict[str, Path]:
    """One adapter directory per name under ``out`` (ranks 2, 4, 8, 2, ... in turn unless
    ``rank`` is given; a classifier's adapters each carry their own head, and those named
    in ``labels`` their own label names)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if task == "classify" else AutoModelForCausalLM
    dirs = {}
    for k, name in enumerate(names):
        model = cls.from_pretrained(str(model_folder)).eval()
        r = rank or 2 ** (1 + k % 3)
        config = (LoRAConfig(r=r, alpha=2 * r, target_modules=["query", "value"],
                             modules_to_save=["classifier"]) if task == "classify"
                  else LoRAConfig(r=r, alpha=2 * r, target_modules=["q_proj", "v_proj"]))
        inject_lora(model, config, adapter=name)
        randomize_adapters(model, seed=seed + k, std=0.5, adapter=name)
        dirs[name] = save_adapter(model, out / name, adapter=name,
                                  label_names=(labels or {}).get(name))
    return dirs


def make_served(root: Path, task: str, names: list[str], hidden: int = 32, layers: int = 2,
                rank: int | None = None, labels: dict[str, list[str]] | None = None
                ) -> tuple[Path, dict[str, Path]]:
    """The model folder and the adapter directories (under ``root/adapters``); ``hidden``
    and ``layers`` size the classifier (the causal LM is always the tiny one)."""
    model = (make_tiny_classifier(root / "model", hidden=hidden, layers=layers)
             if task == "classify" else make_tiny_lm(root / "model"))
    return model, make_adapters(model, root / "adapters", names, task, rank=rank,
                                labels=labels)
