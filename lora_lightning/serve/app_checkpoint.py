"""A classifier checkpoint of the Hydra app (``lora-lightning``), built for serving.

An app run writes ``<run>/checkpoints/best.ckpt`` beside ``<run>/.hydra/config.yaml`` (the
composed config) and ``<run>/result.json`` (docs/app.md, "Where things go"). The module
class is the config's ``model._target_`` and its network ``model.net``: the checkpoint
holds the module's hyperparameters but not the network, which the module keeps out of its
hyperparameters, so the network is built from the run's config (as the app built it, the
head sized by the checkpoint's ``num_classes``) and passed to
:func:`~lora_lightning.load_lora_checkpoint` as a keyword, the README's way of loading an
app checkpoint for inference. Nothing from ``lora_lightning.examples`` is imported: the
classes come from the recorded class paths.

- The checkpoint's own adapter is served under its name (``default`` unless the run
  trained a named one); the adapter directories of ``--adapters`` load beside it.
- ``null`` (no adapter) is the base network with its untrained head, initialised from the
  run's ``seed`` so that it is the same on every start.
- The tokenizer is the datamodule's (its ``model_path``) or else that of the network's
  transformers model; texts are truncated at the datamodule's ``max_length``; the network
  gets ``input_ids`` and ``attention_mask``, as the app's batches hold.
- Label names come from the checkpoint (a datamodule that saves them, such as
  ``TextFilesDataModule``), else from the run's ``result.json``, else ``"0"``, ``"1"``, ...
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG = Path(".hydra") / "config.yaml"
RESULT = "result.json"
INPUTS = ("input_ids", "attention_mask")


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True for a file (an app checkpoint), False for a folder (a transformers model)."""
    return Path(path).is_file()


def run_config_path(checkpoint: str | os.PathLike) -> Path:
    """``<run>/.hydra/config.yaml`` of ``<run>/checkpoints/<name>.ckpt`` (or of a checkpoint
    directly in ``<run>``); SystemExit naming both places when neither has it."""
    ckpt = Path(checkpoint).resolve()
    places = [ckpt.parent.parent / CONFIG, ckpt.parent / CONFIG]
    for place in places:
        if place.is_file():
            return place
    raise SystemExit(
        f"--model {checkpoint}: no app run config beside this checkpoint (looked for "
        f"{' and '.join(map(str, places))}); an app checkpoint is served from its run folder "
        "(<run>/checkpoints/best.ckpt beside <run>/.hydra/config.yaml), or pass a "
        "save_pretrained folder instead")


def _interpolations(node: Any, key: str):
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from _interpolations(v, f"{key}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _interpolations(v, f"{key}[{i}]")
    elif isinstance(node, str) and "${" in node:
        yield key, node


def read_run_config(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The run's ``model`` and ``seed``, checked: a classifier app run (``model.net`` with a
    ``_target_``) whose network settings hold no OmegaConf interpolation (resolving one
    would run whatever resolver it names). Reads YAML only, so the HTTP process can check
    ``--model`` before its worker loads anything."""
    from omegaconf import OmegaConf

    path = run_config_path(checkpoint)
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    model = cfg.get("model") if isinstance(cfg, dict) else None
    net = model.get("net") if isinstance(model, dict) else None
    if not isinstance(net, dict) or not isinstance(net.get("_target_"), str) \
            or not isinstance(model.get("_target_"), str):
        target = model.get("_target_") if isinstance(model, dict) else None
        raise SystemExit(
            f"--model {checkpoint}: the run config {path} has model._target_={target!r} "
            "without a model.net network, so it is not a classifier run (model=minilm or "
            "model=digits_cnn); the server takes classifier app checkpoints. For a causal LM "
            "run, export it (python -m lora_lightning.examples.language.export <ckpt> <out>) "
            "and serve the base model folder with <out>/adapter in --adapters")
    for key, value in _interpolations(net, "model.net"):
        raise SystemExit(
            f"--model {checkpoint}: {path} sets {key}={value!r}, an OmegaConf interpolation; "
            "the server does not resolve the run config's interpolations (a resolver runs on "
            "this machine): write the value itself in the config")
    seed = cfg.get("seed", 0)
    return {"path": path, "model": model, "seed": seed if isinstance(seed, int) else 0}


@dataclass
class AppClassifier:
    """What :func:`load_app_checkpoint` gives the server."""

    module: Any
    tokenizer: Any
    labels: list[str]
    max_length: int | None
    adapter: str


def _label_names(ckpt: Mapping[str, Any], run_dir: Path, num_classes: int) -> list[str]:
    for value in ckpt.values():  # a datamodule's state: {"label_names": [...]}
        if isinstance(value, Mapping) and isinstance(value.get("label_names"), list | tuple):
            names = [str(n) for n in value["label_names"]]
            if len(names) == num_classes:
                return names
    try:
        names = json.loads((run_dir / RESULT).read_text()).get("label_names")
    except (OSError, ValueError, AttributeError):
        names = None
    if isinstance(names, list) and len(names) == num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]


def _hf_model(net: Any) -> Any:
    """The first transformers model inside ``net`` (it has a ``config.name_or_path``)."""
    for module in net.modules():
        config = getattr(module, "config", None)
        if getattr(config, "name_or_path", None):
            return module
    return None


def load_app_checkpoint(checkpoint: str | os.PathLike) -> AppClassifier:
    """Build the run's classifier module, load ``checkpoint`` into it with
    :func:`~lora_lightning.load_lora_checkpoint` (safe loading, fingerprint check), and
    find its tokenizer, label names and text length (see the module doc)."""
    import hydra
    import torch
    from omegaconf import OmegaConf

    from .. import load_lora_checkpoint, read_checkpoint
    from ..checkpoint.meta import META_KEY
    from ..layers.base import DEFAULT_ADAPTER

    run = read_run_config(checkpoint)
    ckpt = read_checkpoint(checkpoint, "cpu")
    hparams = ckpt.get("hyper_parameters") or {}
    num_classes = hparams.get("num_classes")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise SystemExit(f"--model {checkpoint}: hyper_parameters.num_classes is "
                         f"{num_classes!r}; an app classifier checkpoint records the number "
                         "of classes there (ClassifierModule does)")
    net_cfg = OmegaConf.create(run["model"]["net"])
    if "num_classes" in net_cfg:
        net_cfg.num_classes = num_classes  # what the app set from the data
    module_cls = hydra.utils.get_class(run["model"]["_target_"])
    torch.manual_seed(run["seed"])  # the untrained head (null) is the same on every start
    net = hydra.utils.instantiate(net_cfg)
    module = load_lora_checkpoint(module_cls, checkpoint, net=net)

    data = ckpt.get("datamodule_hyper_parameters") or {}
    source = data.get("model_path") if isinstance(data, Mapping) else None
    if not source:
        hf = _hf_model(net)
        source = hf.config.name_or_path if hf is not None else None
    if not source:
        raise SystemExit(f"--model {checkpoint}: no tokenizer found (the datamodule records "
                         "no model_path and the network holds no transformers model); the "
                         "server serves text classifiers")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    max_length = data.get("max_length") if isinstance(data, Mapping) else None
    adapter = (ckpt.get(META_KEY) or {}).get("adapter") or DEFAULT_ADAPTER
    labels = _label_names(ckpt, Path(run["path"]).parent.parent, num_classes)
    return AppClassifier(module, tokenizer, labels,
                         max_length if isinstance(max_length, int) else None, adapter)
