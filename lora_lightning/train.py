"""Hydra entry point: ``lora-lightning`` and ``python -m lora_lightning.train``.

One job, in this order::

    config (conf/train.yaml + overrides)
      -> lora callback   (first: a bad LoRA setting fails before any model loads)
      -> data, model, callbacks, loggers, Trainer   (each from its ``_target_``)
      -> fit (a run that ends at trainer.max_steps validates at its last step)
      -> test the best checkpoint -> <output_dir>/result.json

After a sweep (``-m``) the ``SweepReport`` Hydra callback reads every ``result.json``
and writes ``sweep.csv``, ``sweep.md`` and ``sweep.png``.

Bad input (an unknown option, a misspelt key, a value of the wrong type, a required value
not given, a missing package, ``lora.config.r=0``, a target that matches nothing) ends
with a one-paragraph message and exit status 1, not a traceback; see
:mod:`lora_lightning.app.command_line` and :mod:`lora_lightning.app.errors`.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from lora_lightning.app.data_info import describe_data, small_test_warning
from lora_lightning.app.errors import AppError, check_ckpt_path, check_missing, explain

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
# ${zpad:${hydra.job.num}} in hydra/default.yaml: job folders 00_, 01_, ... 10_ sort in
# run order, in file listings and in TensorBoard's run list alike.
OmegaConf.register_new_resolver("zpad", lambda n, width=2: f"{int(n):0{int(width)}d}",
                                replace=True)


def main() -> None:
    """The console script: the command line's keys and values checked, then the app.

    A misspelt key or a value of the wrong type (``trainer.max_epochs=abc``) ends here
    with one paragraph and exit status 1 (see :mod:`lora_lightning.app.command_line`).
    """
    from lora_lightning.app.command_line import override_problem

    problem = override_problem(sys.argv[1:])
    if problem is not None:
        sys.stderr.write(f"{problem}\n")
        raise SystemExit(1)
    _app()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def _app(cfg: DictConfig) -> float | None:
    """Train one job; return its test accuracy (what a Hydra sweeper would optimise)."""
    return train(cfg).get("test_acc")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Build everything from ``cfg``, fit, test, write ``result.json``; return the result."""
    # Heavy imports here, so `lora-lightning --help` answers at once.
    import lightning as L
    import torch

    from lora_lightning.app.last_step_validation import LastStepValidation
    from lora_lightning.app.recorder import RunRecorder
    from lora_lightning.app.report import lora_variant

    check_missing(cfg)
    _full_rank_runs_baseline(cfg)
    _name_run_after_its_folder(cfg)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    lora = cfg.lora
    lora_callback = _build(lora.callback, "lora.callback") if lora.get("callback") else None
    datamodule = _build(cfg.data, "data")
    data = _describe(datamodule, cfg)
    _classes_from_data(cfg, data)
    model = _build(cfg.model, "model")
    callbacks = [
        _build(node, f"callbacks.{name}") for name, node in (cfg.get("callbacks") or {}).items()
    ]
    loggers = [_build(node, f"logger.{name}") for name, node in (cfg.get("logger") or {}).items()]
    recorder = RunRecorder(
        str(cfg.run_name), str(lora.kind), {"lr": _lr(cfg), "run_seed": int(cfg.seed)}
    )
    callbacks.append(recorder)  # before the LoRA callback: its hparams record comes first
    callbacks.append(LastStepValidation())  # a max_steps run validates (and checkpoints)
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
    check_ckpt_path(cfg.get("ckpt_path"))
    if trainer.global_rank == 0 and cfg.get("logger") and "tensorboard" in cfg.logger:
        from lora_lightning.app.dashboard import write_layout

        write_layout(cfg.paths.log_dir)  # before the first run logs: first in the run list
    lr_found = _lr_find(cfg, trainer, model, datamodule, output_dir)
    if lr_found is not None:
        recorder.hparams["lr"] = lr_found  # the HParams tab shows the rate that trained
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except Exception as err:
        explained = explain(err, "fit", ckpt_path=cfg.get("ckpt_path"))
        if explained is None:
            raise
        raise explained from err
    fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    tested: dict[str, float] = {}
    if cfg.get("test", True) and data.get("test_size") != 0:
        best = checkpoint.best_model_path if checkpoint is not None else ""
        out = trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
        tested = {k: float(v) for k, v in (out[0] if out else {}).items()}
    test_acc = tested.get("test/acc")

    result = {
        "run": str(cfg.run_name),
        "run_id": str(cfg.run_id),
        "kind": str(lora.kind),
        "rank": int(lora.config.r) if lora.get("config") else None,
        "targets": _targets(lora),
        "label": lora.get("label"),  # the lora option's own name for its targets, if it has one
        "variant": lora_variant(lora.get("config")),  # DoRA, rsLoRA, LoRA+: in the run's label
        "seed": int(cfg.seed),
        "lr": lr_found if lr_found is not None else _lr(cfg),
        "lr_found": lr_found,
        **recorder.results,
        "metric": "acc (plain accuracy: correct / all test samples)",
        "test_acc": test_acc,
        "test_balanced_acc": tested.get("test/balanced_acc"),
        **data,
        "monitor": f"{checkpoint.monitor} ({checkpoint.mode})" if checkpoint else None,
        "best_val_acc": _best_val(checkpoint, fit_metrics),
        "final_val_acc": fit_metrics.get("val/acc"),  # the last validation's
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
        from lora_lightning.app.dashboard import log_run

        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
        log_run(trainer.loggers, recorder.logged_hparams, result, trainer.global_step)
        log.info(
            "run %s: test acc %s, %s trainable (%.3f%%), fit %.1f s, result in %s",
            cfg.run_id,
            "n/a" if test_acc is None else f"{test_acc:.4f}",
            f"{result.get('trainable_params', 0):,}",
            100 * result.get("trainable_ratio", 0.0),
            result.get("fit_seconds", 0.0),
            output_dir / RESULT_FILE,
        )
        if not _in_sweep():
            from lora_lightning.app.report import run_summary

            print(run_summary(result), flush=True)
    return result


# -- helpers ------------------------------------------------------------------------------
def _describe(datamodule: Any, cfg: DictConfig) -> dict[str, Any]:
    """:func:`describe_data`, with bad data files explained as ``data`` errors."""
    try:
        data = describe_data(datamodule)
    except Exception as err:
        explained = explain(err, "data", str(cfg.data.get("_target_")))
        if explained is None:
            raise
        raise explained from err
    warning = small_test_warning(data["test_size"], data["test_majority_acc"])
    if warning:
        log.warning("run %s: %s", cfg.run_id, warning)
    return data


def _classes_from_data(cfg: DictConfig, data: dict[str, Any]) -> None:
    """Size the model's head from the data: ``model.net.num_classes: null`` means that."""
    net = OmegaConf.select(cfg, "model.net", default=None)
    if not isinstance(net, DictConfig) or "num_classes" not in net:
        return
    wanted, found = net.get("num_classes"), data.get("num_classes")
    names = f" {data['label_names']}" if data.get("label_names") else ""
    if wanted is None:
        if found is None:
            raise AppError(
                f"model.net.num_classes is null (meaning: from the data), but the data "
                f"({cfg.data.get('_target_')}) has no `num_classes`; set "
                "model.net.num_classes=<number of classes>."
            )
        with open_dict(cfg):
            cfg.model.net.num_classes = found
    elif found is not None and int(wanted) != found:
        raise AppError(
            f"model.net.num_classes={wanted}, but the data ({cfg.data.get('_target_')}) has "
            f"{found} classes{names}; drop the override (model.net.num_classes=null sizes "
            "the head from the data)."
        )


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
    """``run_id`` := the job folder's name (``<job number, 2 digits>_<run_name>`` in a sweep), so
    TensorBoard runs and folders match and jobs that share a run name stay apart."""
    if not HydraConfig.initialized():
        return  # not inside a Hydra app (e.g. a test calling train() with a composed config)
    output_dir = OmegaConf.select(HydraConfig.get(), "runtime.output_dir", default=None)
    if not output_dir:
        return
    folder = Path(output_dir).name
    with open_dict(cfg):
        cfg.run_id = folder


def _lr_find(cfg: DictConfig, trainer: Any, model: Any, datamodule: Any,
             output_dir: Path) -> float | None:
    """With ``lr_find.enabled``: run Lightning's LR range test, set the model's ``lr``.

    ``Tuner.lr_find`` trains ``num_training`` steps with the learning rate rising from
    ``min_lr`` to ``max_lr`` and restores the model's weights. The app records the raw loss
    of each step and picks the rate itself (:mod:`lora_lightning.app.lr_range`: a tenth of
    the rate at the lowest 5-step average; Lightning's own curve is biased at its start);
    it is written into the module's ``lr`` (``hparams.lr``) before fit and recorded in
    ``result.json`` as ``lr_found``, with the curve in ``lr_find.png``.
    """
    options = cfg.get("lr_find")
    if not options or not options.get("enabled"):
        return None
    from lightning.pytorch.tuner import Tuner
    from lightning.pytorch.utilities.parsing import lightning_setattr

    from lora_lightning.app import lr_range

    with lr_range.record_losses(model) as losses:
        finder = Tuner(trainer).lr_find(
            model, datamodule=datamodule, min_lr=float(options.min_lr),
            max_lr=float(options.max_lr), num_training=int(options.num_training),
            update_attr=False,
        )
    lrs = finder.results.get("lr", []) if finder is not None else []
    test = lr_range.suggest_lr(lrs, losses)
    if test.suggestion is None:
        log.warning("run %s: lr_find found no suggestion; keeping lr=%s", cfg.run_id, _lr(cfg))
        return None
    lightning_setattr(model, "lr", test.suggestion)  # hparams.lr or a plain `lr`, as Lightning
    if trainer.global_rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        lr_range.plot(test, output_dir / "lr_find.png", title=f"LR range test: {cfg.run_name}")
        log.info("run %s: lr_find suggests lr=%.3g, a tenth of the lowest average loss's "
                 "%.3g (curve in %s)", cfg.run_id, test.suggestion, test.lrs[test.min_index],
                 output_dir / "lr_find.png")
    return float(test.suggestion)


def _in_sweep() -> bool:
    """True for a job of a multirun (``-m``), whose table the sweep report prints."""
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


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
