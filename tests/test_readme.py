"""README.md's code blocks run as written (after `make demo`), each in a fresh process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_first_python_block_runs_as_written(tmp_path):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.DOTALL).group(1)
    assert "load_lora_checkpoint" in block and 'ckpt_path="last"' in block
    script = tmp_path / "readme_block.py"
    script.write_text(block + "\nprint('MERGED', type(model).__name__, model.training)\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "MERGED ClassifierModule False" in proc.stdout
    assert re.search(r"^predicted \[(\d, ){7}\d\] labels \[(\d, ){7}\d\]$", proc.stdout,
                     re.MULTILINE), proc.stdout  # the inference call after loading runs
    assert (tmp_path / "ckpts" / "last.ckpt").is_file()
    assert "Restoring states from the checkpoint path" in proc.stderr + proc.stdout


@pytest.mark.parametrize("section, expected", [
    ("## The core, without Lightning", r"\['0', '2'\] ParamCount\(trainable=\d+"),
    ("## Many adapters on one base", None),
    ("## QLoRA: LoRA on a 4-bit base", r"^LoRALinear4bit\b"),
])
def test_section_python_block_runs_as_written(tmp_path, section, expected):
    """The first Python block of each README section that shows the API on its own runs
    as printed, in a fresh process: no name it uses is left for the reader to define."""
    text = README.read_text()
    block = re.search(r"```python\n(.*?)```", text[text.index(section):], re.DOTALL).group(1)
    script = tmp_path / "readme_block.py"
    script.write_text(block)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    if expected is not None:
        assert re.search(expected, proc.stdout, re.MULTILINE), proc.stdout
    if section.startswith("## Many adapters"):
        assert sorted(p.name for p in (tmp_path / "adapters").iterdir() if p.is_dir()) == [
            "blend", "party", "sentiment"]
