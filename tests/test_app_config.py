"""Every config group of the Hydra app composes, and every component instantiates.

Configs are composed in-process with Hydra's compose API (no subprocess), so this file
runs in seconds; the end-to-end runs are in test_app_run.py and test_sweep_launchers.py.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

import lora_lightning.train as app
from lora_lightning import LoRACallback
from lora_lightning.app import HeadOnly

CONF = Path(app.__file__).parent / "conf"
GROUPS = ["model", "data", "lora", "trainer", "logger", "callbacks", "paths", "experiment"]
OPTIONS = [
    (group, path.stem) for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))
]
LAUNCHERS = sorted(p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml"))


@contextmanager
def composed(tmp_path: Path, *overrides: str):
    """The app's config for ``overrides``, with Hydra's runtime set as in a real run."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.group_dir = str(tmp_path)
            cfg.paths.output_dir = str(tmp_path / "run")
        yield cfg


def test_top_level_conf_is_the_packaged_conf():
    top = Path(__file__).resolve().parents[1] / "conf"
    assert top.is_dir() and (top / "train.yaml").is_file()
    assert top.resolve() == CONF.resolve()


def test_every_group_has_options():
    found = {group for group, _ in OPTIONS}
    assert found == set(GROUPS)
    assert {"qv", "all_linear", "none", "head_only"} <= {o for g, o in OPTIONS if g == "lora"}
    assert {"full_vs_lora", "full_split", "rank_sweep"} <= {o for g, o in OPTIONS if g == "experiment"}
    assert {"parallel", "slurm", "slurm_local"} <= set(LAUNCHERS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_resolves(tmp_path, group, option):
    with composed(tmp_path, f"{group}={option}") as cfg:
        assert cfg.hydra.runtime.choices[group] == option
        job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        OmegaConf.resolve(job)  # no dangling interpolation in any option
        for key in ("model", "data", "trainer"):
            assert "_target_" in job[key], f"{group}={option}: {key} has no _target_"


def test_defaults_are_minilm_rotten_tomatoes_lora_qv(tmp_path):
    with composed(tmp_path) as cfg:
        choices = cfg.hydra.runtime.choices
        assert (choices.model, choices.data, choices.lora) == ("minilm", "rotten_tomatoes", "qv")
        assert (choices.trainer, choices.logger) == ("cpu", "tensorboard")
        assert cfg.data.train_size == 1500 and cfg.data.test_size == 1000


@pytest.mark.parametrize("option", ["minilm", "digits_cnn"])
def test_model_options_instantiate(tmp_path, option):
    from lora_lightning.examples import ClassifierModule

    with composed(tmp_path, f"model={option}") as cfg:
        assert cfg.model.net.num_classes is None  # from the data, filled in by the app
        app._classes_from_data(cfg, {"num_classes": 3, "label_names": None})
        model = instantiate(cfg.model)
    assert isinstance(model, ClassifierModule)
    assert model.hparams.lr == cfg.model.lr
    assert model.hparams.num_classes == 3


def test_number_of_classes_comes_from_the_data_or_is_an_error(tmp_path):
    data = {"num_classes": 2, "label_names": ["neg", "pos"]}
    with composed(tmp_path, "model=minilm", "model.net.num_classes=5") as cfg:
        with pytest.raises(app.AppError, match=r"model\.net\.num_classes=5, but the data "
                           r"\(.*RottenTomatoesDataModule\) has 2 classes \['neg', 'pos'\]"):
            app._classes_from_data(cfg, data)
    with composed(tmp_path, "model=minilm") as cfg:
        with pytest.raises(app.AppError, match=r"has no `num_classes`; set model\.net\.num_c"):
            app._classes_from_data(cfg, {"num_classes": None})


@pytest.mark.parametrize("option", ["rotten_tomatoes", "digits", "text_files"])
def test_data_options_instantiate(tmp_path, option):
    from lightning.pytorch import LightningDataModule

    extra = [f"data.train={tmp_path / 'train.csv'}"] if option == "text_files" else []
    with composed(tmp_path, f"data={option}", *extra) as cfg:
        assert isinstance(instantiate(cfg.data), LightningDataModule)


@pytest.mark.parametrize(
    ("option", "kind", "expected"),
    [
        ("qv", "lora", LoRACallback),
        ("all_linear", "lora", LoRACallback),
        ("conv", "lora", LoRACallback),
        ("head_only", "head_only", HeadOnly),
        ("none", "full", type(None)),
    ],
)
def test_lora_options_build_their_callback(tmp_path, option, kind, expected):
    with composed(tmp_path, f"lora={option}") as cfg:
        callback = instantiate(cfg.lora.callback) if cfg.lora.callback else None
        assert cfg.lora.kind == kind
        assert cfg.model.lr == cfg.lora.lr  # each kind of run brings its learning rate
    assert isinstance(callback, expected)
    if isinstance(callback, LoRACallback):
        assert callback.config.modules_to_save == ["classifier"]
        assert callback.export_adapter_dir == str(tmp_path / "run" / "adapter")


def test_all_linear_emb_adapts_all_linear_layers_and_the_token_embedding(tmp_path):
    # Its target list names all-linear's layers of MiniLM: planned on the real model, it
    # must be exactly all-linear's plan plus the word embedding table.
    from lora_lightning import LoRAConfig, plan_injection

    with composed(tmp_path, "lora=all_linear_emb", "model.net.num_classes=2") as cfg:
        net = instantiate(cfg.model.net)
        config = LoRAConfig(**OmegaConf.to_container(cfg.lora.config))
        assert cfg.lora.lr == 1.0e-3 and cfg.lora.label == "LoRA all-linear+embeddings"
    linear = dataclasses.replace(config, target_modules="all-linear")
    plan = plan_injection(net, config).new
    all_linear = set(plan_injection(net, linear).new)
    assert set(plan) - all_linear == {"encoder.embeddings.word_embeddings"}
    assert all_linear <= set(plan) and len(all_linear) == 36
    # The embedding's update at a tenth of the others' scale (full FT's rate / LoRA's).
    scales = {name: layer.scaling for name, layer in plan.items()}
    assert scales.pop("encoder.embeddings.word_embeddings") == pytest.approx(0.2)
    assert set(scales.values()) == {2.0}


def test_all_linear_r64_moves_b_a_per_step_as_all_linear_does(tmp_path):
    # Under Adam each entry of B moves about the rate per step, so B·A grows by about
    # scale * sqrt(r) * rate: rank 64 at rsLoRA's scale must match rank 8's, at the same rate.
    from lora_lightning import LoRAConfig

    runs = {}
    for option in ("all_linear", "all_linear_r64"):
        with composed(tmp_path, f"lora={option}") as cfg:
            config = LoRAConfig(**OmegaConf.to_container(cfg.lora.config))
            runs[option] = (config, cfg.lora.lr, cfg.lora.get("label"),
                            instantiate(cfg.lora.callback))
    (r8, r8_lr, _, _), (r64, r64_lr, label, callback) = runs.values()
    speed = {c.r: c.scaling_for(c.r, c.alpha) * c.r ** 0.5 for c in (r8, r64)}
    assert speed[64] == pytest.approx(speed[8], rel=1e-4)
    assert (r64_lr, r64.target_modules) == (r8_lr, r8.target_modules)
    assert (r64.init, r64.r) == ("gradient", 64)
    assert label is None  # the report names it by its targets, rank and variant
    assert isinstance(callback, LoRACallback)


def test_learning_rate_follows_the_kind_of_run(tmp_path):
    rates = {}
    for option in ("none", "qv", "all_linear", "head_only"):
        with composed(tmp_path, f"lora={option}") as cfg:
            rates[option] = cfg.model.lr
    assert rates == {"none": 1e-4, "qv": 3e-3, "all_linear": 1e-3, "head_only": 3e-3}
    with composed(tmp_path, "lora=none", "model.lr=5e-5") as cfg:
        assert cfg.model.lr == 5e-5


def test_lora_overrides_reach_the_config(tmp_path):
    with composed(tmp_path, "lora=all_linear", "lora.config.r=16", "lora.config.alpha=32") as cfg:
        callback = instantiate(cfg.lora.callback)
    assert (callback.config.r, callback.config.alpha) == (16, 32.0)
    assert callback.config.target_modules == "all-linear"


# One override per LoRAConfig field, each without a leading "+", and the value it builds.
FIELD_OVERRIDES = {
    "r": ("4", 4),
    "alpha": ("32", 32.0),
    "dropout": ("0.1", 0.1),
    "target_modules": ("[query,key]", ["query", "key"]),
    "exclude_modules": ("[value]", ["value"]),
    "rank_pattern": ("{query: 4}", {"query": 4}),
    "alpha_pattern": ("{query: 8}", {"query": 8}),
    "use_rslora": ("true", True),
    "init": ("gaussian", "gaussian"),
    "bias": ("lora_only", "lora_only"),
    "modules_to_save": ("[pooler]", ["pooler"]),
    "use_dora": ("true", True),
    "adapter_dtype": ("bfloat16", "bfloat16"),
    "loraplus_lr_ratio": ("16", 16.0),
    "quantize_base": ("nf4", "nf4"),
}


def test_every_lora_config_field_is_listed_in_the_packaged_config(tmp_path):
    from dataclasses import fields

    from lora_lightning import LoRAConfig

    names = [f.name for f in fields(LoRAConfig)]
    assert sorted(FIELD_OVERRIDES) == sorted(names)  # this test covers every field
    with composed(tmp_path) as cfg:
        assert list(cfg.lora.config) == names  # in the dataclass's order
        built = instantiate(cfg.lora.callback).config
    assert built.dropout == 0.05 and built.modules_to_save == ["classifier"]  # qv's own


@pytest.mark.parametrize("name", sorted(FIELD_OVERRIDES))
@pytest.mark.parametrize("option", ["qv", "all_linear", "lm_qv"])
def test_every_lora_config_field_is_set_without_a_plus(tmp_path, option, name):
    text, value = FIELD_OVERRIDES[name]
    with composed(tmp_path, f"lora={option}", f"lora.config.{name}={text}") as cfg:
        callback = instantiate(cfg.lora.callback)
    assert getattr(callback.config, name) == value


@pytest.mark.parametrize("option", ["none", "head_only"])
def test_options_without_a_lora_config_still_compose(tmp_path, option):
    with composed(tmp_path, f"lora={option}") as cfg:
        assert cfg.lora.config is None


@pytest.mark.parametrize(
    ("option", "extra", "strategy"),
    [
        ("cpu", [], "SingleDeviceStrategy"),
        ("gpu", ["trainer.accelerator=cpu"], "SingleDeviceStrategy"),
        ("ddp", ["trainer.accelerator=cpu", "trainer.devices=2"], "DDPStrategy"),
    ],
)
def test_trainer_options_instantiate(tmp_path, option, extra, strategy):
    # gpu/ddp are built on this CPU machine with accelerator=cpu; the rest is theirs.
    with composed(tmp_path, f"trainer={option}", *extra) as cfg:
        trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert isinstance(trainer, Trainer)
    assert type(trainer.strategy).__name__ == strategy
    assert trainer.max_epochs == 1


@pytest.mark.parametrize("option", ["tensorboard", "csv"])
def test_logger_options_instantiate_into_the_shared_log_dir(tmp_path, option):
    with composed(tmp_path, f"logger={option}") as cfg:
        (node,) = cfg.logger.values()
        logger = instantiate(node)
    assert Path(logger.save_dir) == tmp_path / "tensorboard"
    assert logger.version == "lora_qv"


def test_callback_options_instantiate(tmp_path):
    with composed(tmp_path, "callbacks=default") as cfg:
        (checkpoint,) = [instantiate(node) for node in cfg.callbacks.values()]
    assert isinstance(checkpoint, ModelCheckpoint)
    assert checkpoint.monitor == "val/acc"
    assert Path(checkpoint.dirpath) == tmp_path / "run" / "checkpoints"
    with composed(tmp_path, "callbacks=none") as cfg:
        assert not cfg.callbacks


@pytest.mark.parametrize("option", LAUNCHERS)
def test_launcher_options_compose_to_a_real_launcher(tmp_path, option):
    with composed(tmp_path, f"hydra/launcher={option}") as cfg:
        launcher = cfg.hydra.launcher
    cls = get_class(launcher._target_)
    expected = {
        "parallel": "JoblibLauncher", "slurm": "SlurmLauncher", "slurm_local": "LocalLauncher"
    }
    assert cls.__name__ == expected[option]
    if option == "parallel":
        assert launcher.n_jobs == 2
    else:
        assert launcher.timeout_min == 60 and launcher.tasks_per_node == 1


def test_full_vs_lora_is_a_four_run_sweep(tmp_path):
    with composed(tmp_path, "experiment=full_vs_lora") as cfg:
        assert cfg.hydra.mode == RunMode.MULTIRUN
        assert cfg.hydra.sweeper.params.lora.split(",") == ["none", "qv", "all_linear_r64", "head_only"]
        assert cfg.name == "full_vs_lora"
        assert cfg.hydra.runtime.choices.model == "minilm"
        # The recipe: a budget of optimizer steps, not epochs, then a linear decay.
        assert (cfg.trainer.max_steps, cfg.trainer.max_epochs) == (200, -1)
        assert cfg.trainer.val_check_interval == 25
        assert cfg.trainer.check_val_every_n_epoch is None
        assert cfg.model.decay == "linear" and cfg.model.warmup_ratio == 0.1
        assert cfg.lora.config.loraplus_lr_ratio is None  # tried, not shipped (experiments/recipe)


def test_full_split_is_three_seeds_on_the_whole_corpus(tmp_path):
    with composed(tmp_path, "experiment=full_split", "lora=all_linear",
                  "trainer.max_epochs=2") as cfg:
        assert cfg.hydra.mode == RunMode.MULTIRUN
        assert cfg.hydra.sweeper.params.seed.split(",") == ["0", "1", "2"]
        assert (cfg.data.train_size, cfg.data.val_size, cfg.data.test_size) == (9000, 1000, 2500)
        assert cfg.hydra.launcher.n_jobs * cfg.num_threads == 2
        assert cfg.trainer.max_epochs == 2 and cfg.trainer.val_check_interval == 0.25
        assert cfg.model.lr == 1.0e-3 and cfg.name == "full_split"


def test_rank_sweep_runs_ranks_and_a_full_baseline_in_parallel(tmp_path):
    with composed(tmp_path, "experiment=rank_sweep") as cfg:
        assert cfg.hydra.mode == RunMode.MULTIRUN
        assert cfg.hydra.sweeper.params.rank.split(",") == [
            "1", "2", "4", "8", "16", "32", "64", "full"
        ]
        assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
        assert cfg.hydra.launcher.n_jobs == 2
        assert cfg.baseline.kind == "full"
    with composed(tmp_path, "experiment=rank_sweep", "rank=4") as cfg:
        assert instantiate(cfg.lora.callback).config.r == 4
        assert cfg.run_name == "rank_4"


def test_rank_full_swaps_in_the_baseline(tmp_path):
    with composed(tmp_path, "experiment=rank_sweep", "rank=full") as cfg:
        app._full_rank_runs_baseline(cfg)
        assert cfg.lora.kind == "full" and cfg.lora.callback is None
        assert cfg.model.lr == 1.0e-4  # the baseline's rate, through ${lora.lr}
        assert cfg.run_name == "rank_full"


def test_rank_full_without_a_baseline_is_a_clear_error(tmp_path):
    with composed(tmp_path, "+rank=full") as cfg:
        with pytest.raises(app.AppError, match="baseline"):
            app._full_rank_runs_baseline(cfg)


def test_digits_experiment_targets_conv_layers(tmp_path):
    with composed(tmp_path, "experiment=digits") as cfg:
        assert cfg.hydra.runtime.choices.lora == "conv"
        callback = instantiate(cfg.lora.callback)
    assert callback.config.target_modules == ["conv1", "conv2"]


def test_every_component_node_has_a_target(tmp_path):
    with composed(tmp_path) as cfg:
        nodes = [cfg.model, cfg.model.net, cfg.data, cfg.trainer, cfg.lora.callback]
        nodes += list(cfg.logger.values()) + list(cfg.callbacks.values())
        assert all(isinstance(n, DictConfig) and "_target_" in n for n in nodes)
        assert cfg.hydra.callbacks.report._target_.endswith("SweepReport")


def test_core_never_imports_hydra():
    code = (
        "import sys, lora_lightning, lora_lightning.lightning.callback, lora_lightning.lightning.loading, "
        "lora_lightning.summary, lora_lightning.merge, lora_lightning.io.adapter_files, "
        "lora_lightning.checkpoint.meta, lora_lightning.checkpoint.checks, lora_lightning.checkpoint.restore, "
        "lora_lightning.io.safe_load, lora_lightning.lightning.checkpoint_io, lora_lightning.examples\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('hydra', 'omegaconf'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_loraplus_from_the_command_line_reaches_the_optimizer(tmp_path):
    """`lora.config.loraplus_lr_ratio=16` needs no `+`, and the app's optimizer (built by
    lora_param_groups) gives the B factors 16 times the learning rate."""
    with composed(tmp_path, "experiment=digits", "lora.config.loraplus_lr_ratio=16",
                  "model.net.num_classes=10") as cfg:
        callback = instantiate(cfg.lora.callback)
        module = instantiate(cfg.model)
    assert callback.config.loraplus_lr_ratio == 16.0
    callback.inject(module)
    groups = {g["name"]: g for g in module.configure_optimizers().param_groups}
    assert groups["lora_B"]["lr"] == pytest.approx(16 * groups["lora"]["lr"])
    assert groups["lora"]["lr"] == pytest.approx(cfg.model.lr)
    b_names = {n for n, p in module.named_parameters() if any(p is q for q in
                                                              groups["lora_B"]["params"])}
    assert b_names == {"net.conv1.lora_B", "net.conv2.lora_B"}
