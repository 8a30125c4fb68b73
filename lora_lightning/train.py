"""Hydra entry point: ``lora-lightning`` and ``python -m lora_lightning.train``.

One job, in this order::

    config (conf/train.yaml + overrides)
      -> lora callback   (first: a bad LoRA setting fails before any model loads)
      -> data, model, callbacks, loggers, Trainer   (each from its ``_target_``)
      -> fit -> test the best checkpoint -> <output_dir>/result.json

After a sweep (``-m``) the ``SweepReport`` Hydra callback reads every ``result.json``
and writes ``sweep.csv``, ``sweep.md`` and ``sweep.png``.

Bad input (an unknown option, a missing package, ``lora.config.r=0``, a target that
matches nothing) ends with a one-paragraph message and exit status 1, not a traceback;
see :mod:`lora_lightning.app.errors`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from lora_lightning.app.errors import AppError, explain

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train one job; return its test accuracy (what a Hydra sweeper would optimise)."""
    return train(cfg).get("test_acc")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Build everything from ``cfg``, fit, test, write ``result.json``; return the result."""
    # Heavy imports here, so `lora-lightning --help` answers at once.
    import lightning as L
    import torch

    from lora_lightning.app.recorder import RunRecorder

    _full_rank_runs_baseline(cfg)
    _name_run_after_its_folder(cfg)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    lora = cfg.lora
    lora_callback = _build(lora.callback, "lora.callback") if lora.get("callback") else None
    datamodule = _build(cfg.data, "data")
    model = _build(cfg.model, "model")
    callbacks = [
        _build(node, f"callbacks.{name}") for name, node in (cfg.get("callbacks") or {}).items()
    ]
    loggers = [_build(node, f"logger.{name}") for name, node in (cfg.get("logger") or {}).items()]
    recorder = RunRecorder(
        str(cfg.run_name), str(lora.kind), {"lr": _lr(cfg), "run_seed": int(cfg.seed)}
    )
    callbacks.append(recorder)  # before the LoRA callback: its hparams record comes first
    if lora_callback is not None:
        callbacks.append(lora_callback)
    trainer = _build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)

    output_dir = Path(cfg.paths.output_dir)
    checkpoint = _checkpoint_callback(trainer)
    log.info(
        "run %s: TensorBoard logs in %s, checkpoints in %s",
        cfg.run_id,
        Path(cfg.paths.log_dir).resolve(),
        Path(checkpoint.dirpath).resolve() if checkpoint and checkpoint.dirpath else "(none)",
    )
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except Exception as err:
        explained = explain(err, "fit")
        if explained is None:
            raise
        raise explained from err
    fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    test_acc = None
    if cfg.get("test", True):
        best = checkpoint.best_model_path if checkpoint is not None else ""
        tested = trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
        test_acc = float(tested[0]["test/acc"]) if tested and "test/acc" in tested[0] else None
        if test_acc is not None and trainer.global_rank == 0:
            for logger in trainer.loggers:
                logger.log_metrics({"hp_metric": test_acc}, step=trainer.global_step)
                logger.finalize("success")

    result = {
        "run": str(cfg.run_name),
        "run_id": str(cfg.run_id),
        "kind": str(lora.kind),
        "rank": int(lora.config.r) if lora.get("config") else None,
        "targets": _targets(lora),
        "seed": int(cfg.seed),
        "lr": _lr(cfg),
        **recorder.results,
        "test_acc": test_acc,
        "best_val_acc": _best_val(checkpoint, fit_metrics),
        "samples_per_sec": fit_metrics.get("perf/samples_per_sec"),
        "checkpoint": str(checkpoint.best_model_path) if checkpoint else None,
        "checkpoint_bytes": _size(checkpoint.best_model_path) if checkpoint else None,
        "adapter_bytes": _size(getattr(lora_callback, "export_adapter_dir", None)),
        "model": str(cfg.model.get("_target_")),
        "data": str(cfg.data.get("_target_")),
        "log_dir": str(Path(cfg.paths.log_dir).resolve()),
        "output_dir": str(output_dir.resolve()),
        "overrides": _overrides(),
        **getattr(model, "run_results", {}),  # a module's own figures (LM: perplexity before/after)
    }
    if trainer.global_rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
        log.info(
            "run %s: test acc %s, %s trainable (%.3f%%), fit %.1f s, result in %s",
            cfg.run_id,
            "n/a" if test_acc is None else f"{test_acc:.4f}",
            f"{result.get('trainable_params', 0):,}",
            100 * result.get("trainable_ratio", 0.0),
            result.get("fit_seconds", 0.0),
            output_dir / RESULT_FILE,
        )
    return result


# -- helpers ------------------------------------------------------------------------------
def _build(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with bad-input errors explained by config key."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise AppError(
            f"{key}: expected a config with a `_target_` (a dotted class path), got "
            f"{OmegaConf.to_yaml(node).strip() if isinstance(node, DictConfig) else node!r}."
        )
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except Exception as err:
        explained = explain(err, key, str(node.get("_target_")))
        if explained is None:
            raise
        raise explained from err


def _full_rank_runs_baseline(cfg: DictConfig) -> None:
    """``rank=full``, a rank sweep's baseline point, runs the ``baseline`` node as ``lora``.

    A Hydra sweep is a product of values, so "r in {1, ..., 64} plus full fine-tuning"
    sweeps one key, ``rank``, whose value ``full`` swaps in the ``baseline`` lora option
    (experiment/rank_sweep.yaml loads lora/none there).
    """
    if str(cfg.get("rank")) != "full":
        return
    if cfg.get("baseline") is None:
        raise AppError(
            "rank=full runs the config's `baseline` lora option, but this config has none; "
            "add `- /lora@baseline: none` to the experiment's defaults, or use lora=none."
        )
    with open_dict(cfg):
        cfg.lora = cfg.baseline


def _name_run_after_its_folder(cfg: DictConfig) -> None:
    """``run_id`` := the job folder's name (``<job number>_<run_name>`` in a sweep), so
    TensorBoard runs and folders match and jobs that share a run name stay apart."""
    if not HydraConfig.initialized():
        return  # not inside a Hydra app (e.g. a test calling train() with a composed config)
    output_dir = OmegaConf.select(HydraConfig.get(), "runtime.output_dir", default=None)
    if not output_dir:
        return
    folder = Path(output_dir).name
    with open_dict(cfg):
        cfg.run_id = folder


def _checkpoint_callback(trainer: Any) -> Any:
    from lightning.pytorch.callbacks import ModelCheckpoint

    return next((cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)), None)


def _lr(cfg: DictConfig) -> float | None:
    lr = OmegaConf.select(cfg, "model.lr", default=None)
    return float(lr) if lr is not None else None


def _targets(lora: DictConfig) -> str:
    if lora.get("config"):
        targets = lora.config.get("target_modules")
        return targets if isinstance(targets, str) else ",".join(map(str, targets))
    modules = OmegaConf.select(lora, "callback.modules", default=None)
    return ",".join(modules) if modules else "all"


def _best_val(checkpoint: Any, metrics: dict[str, float]) -> float | None:
    if checkpoint is not None and checkpoint.best_model_score is not None:
        return float(checkpoint.best_model_score)
    return metrics.get("val/acc")


def _size(path: str | Path | None) -> int | None:
    if not path or not Path(path).exists():
        return None
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _overrides() -> list[str]:
    if not HydraConfig.initialized():
        return []  # not inside a Hydra app
    return list(OmegaConf.select(HydraConfig.get(), "overrides.task", default=None) or [])


if __name__ == "__main__":
    main()
