"""End-to-end runs of the app on small examples, each in a subprocess (as a user runs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
FAST = ["trainer.max_epochs=1", "trainer.enable_progress_bar=false"]
# What every run logs, with or without LoRA, so TensorBoard lines runs up.
TAGS = {
    "train/loss", "val/loss", "val/acc", "val/balanced_acc", "test/acc", "test/balanced_acc",
    "lora/trainable_ratio", "lora/trainable_params", "lora/total_params",
    "perf/samples_per_sec", "perf/peak_mem_mb", "perf/run_peak_rss_mb", "perf/fit_seconds",
    "perf/peak_tensor_mb", "perf/train_gflops_per_step", "perf/tensor_mb/activations",
}


def run_app(cwd: Path, *args: str, pythonpath: str | None = None, script: bool = False):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    cmd = (
        [str(Path(sys.executable).parent / "lora-lightning")]
        if script else [sys.executable, "-m", "lora_lightning.train"]
    )
    proc = subprocess.run(
        [*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def results_under(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("result.json"))]


def tensorboard_tags(run_dir: Path) -> tuple[set[str], dict]:
    """Scalar tags and the hparams (name -> value) of one TensorBoard run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    hparams: dict = {}
    for content in acc.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            for name, value in data.session_start_info.hparams.items():
                hparams[name] = value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
    return set(acc.Tags()["scalars"]), hparams


def test_digits_run_writes_result_checkpoint_adapter_and_logs(tmp_path):
    proc = run_app(
        tmp_path, "experiment=digits", *FAST, "logger=[tensorboard,csv]", "trainer.log_every_n_steps=2",
    )
    out = proc.stdout + proc.stderr
    assert "run lora_conv: TensorBoard logs in" in out and "checkpoints in" in out
    (result,) = results_under(tmp_path / "outputs")
    assert result["run"] == "lora_conv" and result["kind"] == "lora" and result["rank"] == 8
    assert 0 < result["trainable_params"] < result["total_params"]
    assert result["test_acc"] > 0.5  # ten classes: chance is 0.1
    assert result["fit_seconds"] > 0 and result["peak_rss_mb"] > 0
    assert result["test_size"] == 270 and 0.1 < result["test_majority_acc"] < 0.2
    assert result["num_classes"] == 10 and result["label_names"][:2] == ["0", "1"]
    assert result["monitor"] == "val/acc (max)"
    parts = [result[f"tensor_{k}_mb"] for k in ("params", "grads", "optimizer", "activations")]
    assert all(p > 0 for p in parts) and result["peak_tensor_mb"] == pytest.approx(sum(parts))
    assert result["train_gflops_per_step"] > 0
    assert Path(result["checkpoint"]).stat().st_size == result["checkpoint_bytes"]
    assert result["adapter_bytes"] > 0
    assert result["overrides"][0] == "experiment=digits"
    run_dir = Path(result["output_dir"])
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    tb_run = Path(result["log_dir"]) / "lora_conv"
    tags, hparams = tensorboard_tags(tb_run)
    assert tags >= TAGS, TAGS - tags
    assert "hp_metric" not in tags  # no placeholder line from -1 to the test accuracy
    assert hparams["run"] == "lora_conv" and hparams["kind"] == "lora"
    # lora/r is a zero-padded string in TensorBoard (a number would print 8.0000)
    assert hparams["lora/r"] == "008" and hparams["lr"] == pytest.approx(0.01)
    assert (tb_run / "metrics.csv").is_file()  # the csv logger shares the run's folder
    # A single run ends with its table and a TensorBoard command that runs as printed.
    assert f"test acc (n=270, majority {result['test_majority_acc']:.3f})" in proc.stdout
    curves = next(line for line in proc.stdout.splitlines() if line.startswith("Curves: "))
    program = curves.split()[1]
    assert program == "tensorboard" or Path(tmp_path, program).is_file(), curves


def test_a_max_steps_run_validates_and_is_labelled_by_its_variant(tmp_path):
    # Digits has ~40 training batches per epoch: 3 steps end mid-epoch, before the
    # epoch's validation, yet the run validates once and tests its best checkpoint.
    proc = run_app(tmp_path, "experiment=digits", "trainer.max_steps=3",
                   "trainer.enable_progress_bar=false", "logger=csv",
                   "lora.config.use_dora=true", "lora.config.loraplus_lr_ratio=4")
    (result,) = results_under(tmp_path / "outputs")
    assert result["best_val_acc"] is not None
    assert Path(result["checkpoint"]).is_file() and result["checkpoint_bytes"] > 0
    assert result["variant"] == "DoRA LoRA+ ratio=4"
    assert "LoRA conv1+conv2 r=8 DoRA LoRA+ ratio=4" in proc.stdout
    metrics = (Path(result["log_dir"]) / "lora_conv" / "metrics.csv").read_text()
    header, *rows = metrics.splitlines()
    column = header.split(",").index("val/acc")
    assert sum(1 for row in rows if row.split(",")[column]) == 1  # one validation


def test_text_files_run_sizes_the_head_from_the_data(tmp_path):
    labels = ["bad", "good", "meh"]
    lines = ["text,label"] + [f"this film is {labels[i % 3]} number {i},{labels[i % 3]}"
                              for i in range(48)]
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "test.tsv").write_text(
        "text\tlabel\n" + "".join(f"so {labels[i % 3]} {i}\t{labels[i % 3]}\n" for i in range(12))
    )
    run_app(tmp_path, "data=text_files", "data.train=train.csv", "data.test=test.tsv",
            "data.max_length=16", "data.batch_size=8", "trainer.max_steps=6",
            "trainer.enable_progress_bar=false", "lora.config.r=2")
    (result,) = results_under(tmp_path / "outputs")
    assert result["num_classes"] == 3 and result["label_names"] == labels
    assert result["test_size"] == 12 and result["test_majority_acc"] == pytest.approx(1 / 3)
    assert result["train_size"] + result["val_size"] == 48
    import torch

    checkpoint = torch.load(result["checkpoint"], weights_only=False)  # a file this test made
    assert checkpoint["TextFilesDataModule"] == {"label_names": labels}  # class order kept


def test_console_script_help_lists_groups_and_launchers(tmp_path):
    proc = run_app(tmp_path, "--help", script=True)
    assert "== Config groups ==" in proc.stdout
    for line in ("lora: all_linear, all_linear_emb, all_linear_r64, conv, head_only, lm_all_linear, lm_full, lm_qlora, lm_qv, none, qv",
                 "model: digits_cnn, minilm, smollm2", "data: digits, hamlet, hamlet_chat,",
                 "experiment: digits, full_split, full_vs_lora, lm_lora, rank_sweep", "trainer: cpu, ddp, gpu",
                 "logger: csv, tensorboard", "hydra/launcher=parallel"):
        assert line in proc.stdout
    # Your own model class: the one form README and docs/app.md show.
    readme = (TESTS.parent / "README.md").read_text()
    own = "'~model' +model._target_=my_pkg.MyModule +model.lr=1e-3"
    assert own in proc.stdout
    assert own.replace("my_pkg.MyModule", "my_project.models.MLPClassifier") in readme
    assert "\nmodel._target_=" not in proc.stdout and " model._target_=" not in proc.stdout


def test_own_module_and_data_through_target_overrides(tmp_path):
    # tests/_custom_module.py is not part of lora_lightning: only PYTHONPATH finds it.
    run_app(
        tmp_path, *FAST,
        "~model", "+model._target_=_custom_module.TinyModule", "+model.hidden=8", "+model.lr=0.05",
        "~data", "+data._target_=_custom_module.TinyData",
        "lora.config.target_modules=[fc1,fc2]", "lora.config.modules_to_save=[head]",
        "run_name=tiny",
        pythonpath=str(TESTS),
    )
    (result,) = results_under(tmp_path / "outputs")
    assert result["model"] == "_custom_module.TinyModule"
    assert result["kind"] == "lora" and result["targets"] == "fc1,fc2"
    assert result["trainable_params"] == 2 * 8 * (8 + 8) + 8 * 2 + 2  # two adapters + head
    assert result["test_acc"] > 0.6


def test_own_module_through_a_config_dir(tmp_path):
    conf = tmp_path / "my_conf"
    (conf / "model").mkdir(parents=True)
    (conf / "data").mkdir()
    (conf / "model" / "tiny.yaml").write_text(
        "_target_: _custom_module.TinyModule\nhidden: 8\nlr: ${lora.lr}\n"
    )
    (conf / "data" / "tiny.yaml").write_text("_target_: _custom_module.TinyData\nn: 128\n")
    run_app(
        tmp_path, "--config-dir", str(conf), "model=tiny", "data=tiny", "lora=head_only",
        "lora.callback.modules=[head]", *FAST, pythonpath=str(TESTS),
    )
    (result,) = results_under(tmp_path / "outputs")
    assert result["kind"] == "head_only" and result["lr"] == pytest.approx(3e-3)
    assert result["trainable_params"] == 8 * 2 + 2


def test_lr_find_sets_the_rate_that_trains(tmp_path):
    # A tenth of a rate in [1e-6, 0.05]: at most 5e-3, so not the shipped 1e-2.
    run_app(tmp_path, "experiment=digits", *FAST, "lr_find.enabled=true",
            "lr_find.num_training=20", "lr_find.max_lr=0.05")
    (result,) = results_under(tmp_path / "outputs")
    assert result["lr_found"] is not None and result["lr"] == result["lr_found"]
    assert 1e-7 <= result["lr_found"] <= 5e-3
    import torch

    checkpoint = torch.load(result["checkpoint"], weights_only=False)  # a file this test made
    assert checkpoint["hyper_parameters"]["lr"] == pytest.approx(result["lr_found"])
    assert (Path(result["output_dir"]) / "lr_find.png").is_file()
    _, hparams = tensorboard_tags(Path(result["log_dir"]) / "lora_conv")
    assert hparams["lr"] == pytest.approx(result["lr_found"])
