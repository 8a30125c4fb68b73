"""Sweeps through real Hydra launchers (joblib, submitit local) on two tiny digits runs.

Each test runs the app with ``-m`` in a subprocess and checks what a user gets: one
result.json per job, the report (sweep.csv/md/png and the printed table) from the
``on_multirun_end`` callback, and TensorBoard runs with the same tags and hparams keys
whether or not the run has LoRA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_app_run import TAGS, tensorboard_tags

FAST = ["trainer.max_epochs=1", "trainer.enable_progress_bar=false", "num_threads=1"]


def sweep(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run(
        [sys.executable, "-m", "lora_lightning.train", "-m", *args, *FAST],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def check_sweep(root: Path, proc: subprocess.CompletedProcess, runs: dict[str, str]) -> Path:
    """``runs``: run name -> kind. Returns the sweep dir."""
    results = [json.loads(p.read_text()) for p in sorted(root.rglob("result.json"))]
    assert {r["run"]: r["kind"] for r in results} == runs
    (sweep_dir,) = {Path(r["output_dir"]).parent for r in results}
    for name in ("sweep.csv", "sweep.md", "sweep.png"):
        assert (sweep_dir / name).is_file(), name
    assert f"tensorboard --logdir {results[0]['log_dir']}" in proc.stdout
    assert "| run " in proc.stdout and "trainable params" in proc.stdout
    seen = [tensorboard_tags(Path(r["log_dir"]) / r["run_id"]) for r in results]
    for tags, hparams in seen:
        assert tags >= TAGS, TAGS - tags
        assert set(hparams) == set(seen[0][1])  # same hparams keys, LoRA or not
    return sweep_dir


def test_rank_sweep_with_joblib_runs_a_rank_and_the_full_baseline(tmp_path):
    proc = sweep(
        tmp_path, "experiment=rank_sweep", "model=digits_cnn", "data=digits", "lora=conv",
        "rank=2,full",
    )
    assert "Joblib.Parallel(" in proc.stdout + proc.stderr
    sweep_dir = check_sweep(tmp_path / "outputs", proc, {"rank_2": "lora", "rank_full": "full"})
    assert sweep_dir.parent.name == "rank_sweep"
    results = {
        json.loads(p.read_text())["run"]: json.loads(p.read_text())
        for p in sweep_dir.rglob("result.json")
    }
    assert results["rank_2"]["rank"] == 2 and results["rank_full"]["rank"] is None
    assert results["rank_full"]["trainable_ratio"] == 1.0
    assert results["rank_full"]["lr"] == 1e-2  # digits_cnn has one rate for every kind


def test_submitit_local_launcher_runs_the_slurm_path(tmp_path):
    proc = sweep(
        tmp_path, "experiment=digits", "lora=none,head_only", "hydra/launcher=slurm_local",
    )
    sweep_dir = check_sweep(tmp_path / "outputs", proc, {"full_ft": "full", "head_only": "head_only"})
    assert (sweep_dir / ".submitit").is_dir()
