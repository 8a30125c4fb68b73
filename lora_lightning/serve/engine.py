"""The served model: a transformers model, its tokenizer and named adapters, answering a
batch of requests in one pass with :func:`~lora_lightning.per_sample_adapters`.

Plain PyTorch and transformers, no LitServe: the server (``server.py``) hands it the
batches its dynamic batching collected, and tests call it directly.

A request is a dict with ``"op"``: ``"predict"`` (``adapter``, ``text``, and for a causal
LM ``max_new_tokens``), ``"list"``, ``"load"`` (``name``, ``path``) or ``"delete"``
(``name``). Every request gets ``{"status": <HTTP status>, "body": <JSON-able dict>}``;
one request's failure never fails the others of its batch. A batch runs its predictions
first (with the adapters it started with), then its loads and deletes in order.

Label names: a classifier answers with the model's (``config.id2label``, or an app
checkpoint's), except for an adapter saved with its own (``save_adapter(...,
label_names=...)``, read back with :func:`~lora_lightning.io.adapter_files.read_label_names`):
an adapter whose head was trained on other classes answers with those.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import delete_adapter, list_adapters, load_adapter, per_sample_adapters
from ..errors import AdapterFileError, LoRAError
from ..io.adapter_files import CONFIG_NAME, LABELS_FIELD, META_NAME, SECTION, read_label_names
from ..registry import AdapterNameError, check_name
from .app_checkpoint import INPUTS, is_checkpoint, load_app_checkpoint, read_run_config

CLASSIFY, GENERATE = "classify", "generate"


def model_task(config: Any) -> str:
    """``"classify"`` or ``"generate"`` from a transformers config's ``architectures`` (a
    config object, or config.json's dict)."""
    archs = list((config.get("architectures") if isinstance(config, dict)
                  else getattr(config, "architectures", None)) or [])
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return CLASSIFY
    if any(a.endswith("ForCausalLM") for a in archs):
        return GENERATE
    raise SystemExit(
        f"the model's config.json names architectures {archs}; the server runs a "
        "*ForSequenceClassification model (label and probabilities) or a *ForCausalLM model "
        "(generated text): save one with save_pretrained and pass its folder to --model")


def folder_task(folder: str | os.PathLike) -> str:
    """:func:`model_task` of a model folder, from its config.json alone, or ``"classify"``
    for an app checkpoint whose run config is a classifier run (the HTTP process checks
    requests with it and never imports transformers)."""
    if is_checkpoint(folder):
        read_run_config(folder)
        return CLASSIFY
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--model {folder}: cannot read {path} ({e}); pass a folder "
                         "written by save_pretrained, or an app checkpoint file "
                         "(<run>/checkpoints/best.ckpt)") from None
    return model_task(config)


def load_base(folder: str | os.PathLike) -> tuple[nn.Module, Any, str]:
    """The model, tokenizer and task of a transformers folder (``save_pretrained``)."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    config = AutoConfig.from_pretrained(folder)
    task = model_task(config)
    cls = AutoModelForSequenceClassification if task == CLASSIFY else AutoModelForCausalLM
    model = cls.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if task == GENERATE:
        tokenizer.padding_side = "left"  # generation continues from the last column
    return model, tokenizer, task


def adapter_dirs(folder: str | os.PathLike) -> dict[str, Path]:
    """Name -> directory for each subdirectory of ``folder`` holding an adapter_config.json
    (sorted by name)."""
    root = Path(folder)
    if not root.is_dir():
        raise SystemExit(f"--adapters {folder}: not a directory; pass a folder whose "
                         "subfolders are adapter directories (save_adapter writes one)")
    return {p.name: p for p in sorted(root.iterdir()) if (p / CONFIG_NAME).is_file()}


def _ok(body: dict) -> dict:
    return {"status": 200, "body": body}


def _error(status: int, message: str) -> dict:
    return {"status": status, "body": {"error": message}}


@dataclass
class ServedModel:
    """A model with named adapters, answering batches of requests (see the module doc)."""

    model: nn.Module
    tokenizer: Any
    task: str
    adapters_root: Path | None = None
    max_new_tokens: int = 64
    labels: list[str] = field(default_factory=list)
    max_length: int | None = None
    """Classifier: tokens per text at most (None: the model's own limit)."""
    inputs: tuple[str, ...] | None = None
    """Classifier: the tokenizer outputs the model takes (None: all), for an app module
    that returns logits rather than a transformers output."""
    adapter_labels: dict[str, list[str]] = field(default_factory=dict)
    """Classifier: the label names an adapter brought with it (see the module doc)."""

    @classmethod
    def load(cls, model_folder: str | os.PathLike, adapters: str | os.PathLike | None,
             max_new_tokens: int = 64) -> ServedModel:
        """A save_pretrained folder, or an app checkpoint (a file; see
        :mod:`~lora_lightning.serve.app_checkpoint`) whose own adapter is served beside
        those of ``adapters``."""
        if is_checkpoint(model_folder):
            app = load_app_checkpoint(model_folder)
            served = cls(app.module, app.tokenizer, CLASSIFY,
                         Path(adapters) if adapters else None, max_new_tokens,
                         labels=app.labels, max_length=app.max_length, inputs=INPUTS)
            for name, path in (adapter_dirs(adapters) if adapters else {}).items():
                served.add_adapter(check_name(name), path)
            return served
        model, tokenizer, task = load_base(model_folder)
        served = cls(model, tokenizer, task, Path(adapters) if adapters else None,
                     max_new_tokens)
        if task == CLASSIFY:
            id2label = model.config.id2label
            served.labels = [str(id2label[i]) for i in range(model.config.num_labels)]
        for name, path in (adapter_dirs(adapters) if adapters else {}).items():
            served.add_adapter(check_name(name), path)
        return served

    def add_adapter(self, name: str, path: Path) -> None:
        """``load_adapter`` under ``name``, with the label names the directory holds (a
        classifier's; their number must be the model's)."""
        labels = read_label_names(path) if self.task == CLASSIFY else None
        if labels is not None and len(labels) != len(self.labels):
            # The file they came from: lora_lightning.json, or an older directory's section
            # of adapter_config.json.
            where, key = ((path / META_NAME, LABELS_FIELD) if (path / META_NAME).is_file()
                          else (path / CONFIG_NAME, f"{SECTION}.{LABELS_FIELD}"))
            raise AdapterFileError(
                f"{where}: adapter {name!r} names {len(labels)} labels "
                f"{labels}, but the served model's head has {len(self.labels)} outputs "
                f"({self.labels}); save the adapter with one name per output of the head",
                str(where), key)
        load_adapter(self.model, path, adapter=name)
        if labels is not None:
            self.adapter_labels[name] = labels

    def labels_of(self, adapter: str | None) -> list[str]:
        """The label names ``adapter`` answers with (None: the base model)."""
        return self.adapter_labels.get(adapter, self.labels) if adapter else self.labels

    # -- batches ----------------------------------------------------------------------
    def run(self, requests: list[dict]) -> list[dict]:
        """One answer per request, in order (see the module doc)."""
        out: list[dict | None] = [None] * len(requests)
        known = set(list_adapters(self.model))
        todo = []
        for i, req in enumerate(requests):
            if req.get("op") != "predict":
                continue
            if req["adapter"] is not None and req["adapter"] not in known:
                out[i] = _error(404, f"no adapter named {req['adapter']!r}; the server holds "
                                     f"{sorted(known)} (null: the base model)")
            else:
                todo.append(i)
        if todo:
            try:
                answers = self.predict([requests[i] for i in todo])
            except Exception as e:  # a model error answers each of these requests
                answers = [_error(500, f"the model failed on this batch: {e}")] * len(todo)
            for i, answer in zip(todo, answers, strict=True):
                out[i] = answer
        for i, req in enumerate(requests):
            if out[i] is None:
                out[i] = self.admin(req)
        return out  # type: ignore[return-value]

    def admin(self, req: dict) -> dict:
        op = req.get("op")
        if op == "list":
            return _ok(self.describe())
        if op == "load":
            return self.hot_load(req["name"], req["path"])
        if op == "delete":
            name = req["name"]
            if name not in list_adapters(self.model):
                return _error(404, f"no adapter named {name!r}; the server holds "
                                   f"{sorted(list_adapters(self.model))}")
            delete_adapter(self.model, name)
            self.adapter_labels.pop(name, None)
            return _ok({"deleted": name, "adapters": list_adapters(self.model)})
        return _error(400, f"unknown operation {op!r}")

    def describe(self) -> dict:
        names = list_adapters(self.model)
        labels = ({"labels": self.labels,
                   "adapter_labels": {n: self.labels_of(n) for n in names}}
                  if self.task == CLASSIFY else {})
        return {"adapters": names, "task": self.task, **labels}

    def hot_load(self, name: str, path: str) -> dict:
        """Load one adapter directory under ``name`` with ``load_adapter``'s checks (safe
        formats only, all-or-nothing): a refused file leaves every other adapter as it was.
        A relative path is taken inside the --adapters folder."""
        try:
            check_name(name)
        except AdapterNameError:
            return _error(400, f"adapter name {name!r} must be letters, digits and "
                               "underscores (for example 'sentiment')")
        if name in list_adapters(self.model):
            return _error(409, f"the server already holds adapter {name!r}; DELETE "
                               f"/adapters/{name} first to replace it")
        where = Path(path)
        if not where.is_absolute() and self.adapters_root is not None:
            where = self.adapters_root / where
        if not (where / CONFIG_NAME).is_file():
            return _error(404, f"{str(where)!r} is not an adapter directory (no {CONFIG_NAME} "
                               "there); pass a folder written by save_adapter or PEFT")
        try:
            self.add_adapter(name, where)
        except (LoRAError, OSError) as e:
            return _error(422, f"adapter {name!r} was refused and nothing changed: {e}")
        return _ok({"loaded": name, "adapters": list_adapters(self.model)})

    # -- the model --------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, requests: list[dict]) -> list[dict]:
        """Predictions for ``requests`` (adapters known) in one batched pass."""
        names = [r["adapter"] for r in requests]
        texts = [r["text"] for r in requests]
        device = next(self.model.parameters()).device
        if self.task == CLASSIFY:
            limit = self.max_length or min(
                self.tokenizer.model_max_length,
                getattr(self.model.config, "max_position_embeddings", 512))
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=limit,
                                 return_tensors="pt").to(device)
            if self.inputs is not None:
                enc = {k: enc[k] for k in self.inputs}
            with per_sample_adapters(self.model, names):
                out = self.model(**enc)
            logits = out if isinstance(out, torch.Tensor) else out.logits
            probs = logits.float().softmax(-1)
            return [_ok({"adapter": n, "label": self.labels_of(n)[int(p.argmax())],
                         "probabilities": dict(zip(self.labels_of(n), p.tolist(),
                                                   strict=True))})
                    for n, p in zip(names, probs, strict=True)]
        steps = [int(r.get("max_new_tokens") or self.max_new_tokens) for r in requests]
        enc = self.tokenizer(texts, padding=True, return_tensors="pt").to(device)
        with per_sample_adapters(self.model, names):
            seqs = self.model.generate(**enc, max_new_tokens=max(steps), do_sample=False,
                                       pad_token_id=self.tokenizer.pad_token_id)
        new = seqs[:, enc["input_ids"].shape[1]:]
        # Greedy decoding is causal: a sequence's first n tokens do not depend on how many
        # follow, so one generate() with the largest max_new_tokens serves every request.
        out = []
        for n, row, k in zip(names, new.tolist(), steps, strict=True):
            ids = row[:k]
            if self.tokenizer.eos_token_id in ids:  # generate() pads after a sequence ends
                ids = ids[:ids.index(self.tokenizer.eos_token_id) + 1]
            out.append(_ok({"adapter": n, "token_ids": ids,
                            "text": self.tokenizer.decode(ids, skip_special_tokens=True)}))
        return out
