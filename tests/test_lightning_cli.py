"""LoRACallback configured from a LightningCLI YAML and from --trainer.callbacks+=...

The module and the data live only in tests/ (_custom_module.py); the CLI script is
tests/_cli_main.py, run in a subprocess as a user runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# fc1, fc2: 8->16, 16->16 at r=8: A+B = 8*(8+16) + 8*(16+16); head 16*2+2 trained in full.
LORA_TRAINABLE = 8 * (8 + 16) + 8 * (16 + 16) + 16 * 2 + 2
TOTAL = (8 * 16 + 16) + (16 * 16 + 16) + (16 * 2 + 2) + 8 * (8 + 16) + 8 * (16 + 16)


def run_cli(cwd: Path, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, str(TESTS / "_cli_main.py"), "fit", *args,
         "--trainer.max_steps=3", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
         "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=1"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("CLI-RESULT "))
    return json.loads(line[len("CLI-RESULT "):])


def test_lora_callback_from_a_lightning_cli_yaml(tmp_path):
    (tmp_path / "lora.yaml").write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lora_lightning.LoRACallback\n"
        "      init_args:\n"
        "        config: {r: 8, target_modules: [fc1, fc2], modules_to_save: [head]}\n"
        "        verbose: false\n"
    )
    result = run_cli(tmp_path, "--config", "lora.yaml")
    (config,) = result["lora"]
    assert config["r"] == 8 and config["target_modules"] == ["fc1", "fc2"]
    assert result["injected"] == [["fc1", "fc2"]]
    assert result["trainable"] == LORA_TRAINABLE and result["total"] == TOTAL
    assert result["steps"] == 3


def test_lora_callback_appended_on_the_command_line(tmp_path):
    result = run_cli(
        tmp_path, "--trainer.callbacks+=lora_lightning.LoRACallback",
        "--trainer.callbacks.config={r: 4, target_modules: [fc1]}",
    )
    (config,) = result["lora"]
    assert config["r"] == 4 and config["target_modules"] == ["fc1"]
    assert result["injected"] == [["fc1"]]
    assert result["trainable"] == 4 * (8 + 16)  # only fc1's adapter: nothing else is saved
