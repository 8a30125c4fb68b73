"""benchmarks/gpu/check_issue19.py (issue 19's one-command GPU check) in its CPU smoke mode:
a single-device mode trains, saves an adapter-only checkpoint, resumes it exactly, loads it
into the plain model and PEFT loads its export; FSDP modes are skipped with the reason
printed. Run as the GPU machine runs it: without hydra (so without ``lora_lightning.app``).
omegaconf and bitsandbytes, also absent there, are not hidden: Lightning and PEFT import
them when their metadata says they are installed, as here. The GPU figures themselves are
pending a GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "check_issue19.py"


def test_the_smoke_mode_runs_a_single_device_mode_and_skips_fsdp(tmp_path):
    absent = tmp_path / "absent"  # the GPU machine lacks hydra: importing it fails
    (absent / "hydra").mkdir(parents=True)
    (absent / "hydra" / "__init__.py").write_text(
        "raise ImportError('hydra is not installed on the GPU machine')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(absent), str(ROOT)]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--modes", "single", "fsdp",
         "--root", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    got = {(r.get("mode"), r["step"]): r for r in lines}
    assert [k for k in got if k[0] == "single"] == [
        ("single", s) for s in ("fit", "checkpoint", "resume", "load", "peft")]
    assert all(got["single", s]["ok"] is True for s in ("fit", "checkpoint", "resume", "load",
                                                        "peft")), lines
    fit = got["single", "fit"]
    assert fit["base_dtypes"] == ["torch.bfloat16"] and fit["adapter_dtypes"] == ["torch.float32"]
    assert fit["frozen_with_grad"] == 0 and fit["grad_mb"] > 0
    ckpt = got["single", "checkpoint"]
    assert ckpt["non_adapter_tensors"] == 0 and ckpt["wrapper_keys"] == 0 and ckpt["tensors"] > 0
    assert got["single", "resume"]["max_diff"] == 0.0 and got["single", "load"]["max_diff"] == 0.0
    assert got["fsdp", "skipped"]["ok"] is None and "CUDA" in got["fsdp", "skipped"]["reason"]
    assert got[None, "summary"]["failed"] == []


def test_a_mode_whose_process_fails_is_a_failure_in_the_summary_and_the_exit_code(tmp_path):
    """Without lightning each mode's process exits 1 before any step: the summary lists
    those processes under ``failed`` and the script exits non-zero (it said ``"failed": []``
    and exited 0)."""
    absent = tmp_path / "absent"
    (absent / "lightning").mkdir(parents=True)
    (absent / "lightning" / "__init__.py").write_text(
        "raise ImportError('lightning is not installed here')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(absent), str(ROOT)]))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--modes", "single32", "single", "fsdp",
         "--root", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    processes = [r for r in lines if r.get("step") == "process"]
    assert [(r["mode"], r["ok"], r["returncode"]) for r in processes] == [
        ("single32", False, 1), ("single", False, 1)], proc.stdout
    assert all("lightning is not installed here" in r["stderr_tail"] for r in processes)
    assert lines[-1]["step"] == "summary"
    assert lines[-1]["failed"] == ["single32:process", "single:process"]
    assert proc.returncode == 1, proc.stderr[-3000:]
