"""A wheel of lora-lightning ships the Hydra configs: the installed app finds them.

Builds the wheel from a copy of the source (so nothing is written into the checkout),
installs it with ``--no-deps`` into a fresh virtualenv that reuses this environment's
packages through a ``.pth`` line (no network), and runs the console script and
``python -m lora_lightning.train`` from a folder with no ``conf/`` in sight.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*cmd: str, cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_wheel_install_runs_the_app_with_its_configs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", src)
    readme = ROOT / "README.md"
    (src / "README.md").write_text(readme.read_text() if readme.is_file() else "lora-lightning\n")
    shutil.copytree(
        ROOT / "lora_lightning", src / "lora_lightning",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path / "dist"), str(src), cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("lora_lightning-*.whl")

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", str(venv), cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(_run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                     cwd=tmp_path).strip())
    # A plain path line: this env's packages become importable, its .pth files (the
    # editable install's finder) are not run, so lora_lightning comes from the wheel.
    (site / "zz_reuse_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel),
         cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(str(python), "-c", "import lora_lightning.train as t; print(t.__file__)",
                 cwd=elsewhere)
    assert where.startswith(str(site))
    assert (site / "lora_lightning" / "conf" / "experiment" / "rank_sweep.yaml").is_file()

    help_text = _run(str(venv / "bin" / "lora-lightning"), "--help", cwd=elsewhere)
    assert "lora: all_linear, all_linear_emb, all_linear_r64, conv, head_only, lm_all_linear, lm_full, lm_qlora, lm_qv, none, qv" in help_text
    job = _run(str(python), "-m", "lora_lightning.train", "experiment=rank_sweep", "rank=4",
               "--cfg", "job", "--resolve", cwd=elsewhere)
    assert "r: 4" in job and "target_modules: all-linear" in job
