"""Soak: 2,000 steps with a checkpoint every 50 (top-3 by the logged loss, plus last).

The run is a fresh child process (``_reliability_worker._soak``), so its memory figures are
its own and not pytest's. It must not grow (RSS and peak RSS at step 2,000 within 10% of
step 200, with checkpoints big enough that keeping each one alive would break that bound),
leave exactly the expected files, and every kept checkpoint must resume.
"""

from __future__ import annotations

import pytest
import torch
from _reliability_worker import (
    SOAK_CONFIG,
    SOAK_EVERY,
    LoRACallback,
    log_of,
    make_trainer,
    run_child,
    soak_loader,
    soak_module,
)
from lightning.pytorch import Callback

from lora_lightning import read_checkpoint

STEPS = 2000


class StartStep(Callback):
    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step


@pytest.mark.slow
def test_soak_memory_flat_files_exact_and_every_checkpoint_resumes(tmp_path):
    spec = {"root": str(tmp_path), "name": "soak", "kind": "soak", "steps": STEPS}
    code, out = run_child(spec, timeout=600)
    assert code == 0 and out is not None, log_of(spec)
    assert out["global_step"] == STEPS
    mib = {s: v / 2**20 for s, v in out["rss"].items()}
    print(f"soak: {STEPS} steps in {out['seconds']:.1f} s; RSS MiB at step 200 {mib[200]:.1f}, "
          f"2000 {mib[2000]:.1f}, min {min(mib.values()):.1f}, max {max(mib.values()):.1f}; "
          f"peak RSS MiB at 200 {out['peak'][200] / 2**20:.1f}, 2000 {out['peak'][2000] / 2**20:.1f}")

    # Memory: flat, and the bound is tight enough to catch a leak of one checkpoint per save.
    assert out["rss"][STEPS] <= 1.10 * out["rss"][200], mib
    assert out["peak"][STEPS] <= 1.10 * out["peak"][200], out["peak"]
    ckpts = tmp_path / "ckpts"
    one = (ckpts / "last.ckpt").stat().st_size
    saves_after_200 = 2 * (STEPS - 200) // SOAK_EVERY  # a top-k candidate and last.ckpt
    assert one * saves_after_200 > 0.10 * out["rss"][200], (one, out["rss"][200])

    # Files: exactly the three lowest losses seen at checkpoint steps, plus last.ckpt.
    losses = out["losses"]
    assert sorted(losses) == list(range(SOAK_EVERY, STEPS + 1, SOAK_EVERY))
    assert len(set(losses.values())) == len(losses)  # no ties, so top-3 is well defined
    best = sorted(losses, key=losses.get)[:3]
    expected = {f"step={s}.ckpt" for s in best} | {"last.ckpt"}
    assert {p.name for p in ckpts.iterdir()} == expected  # nothing else, no hidden files

    # Every kept checkpoint loads and resumes for a few steps.
    for name in sorted(expected):
        ckpt = read_checkpoint(ckpts / name)
        step = ckpt["global_step"]
        assert step == (STEPS if name == "last.ckpt" else int(name[5:-5]))
        start = StartStep()
        trainer = make_trainer(tmp_path, LoRACallback(SOAK_CONFIG, verbose=False), start,
                               max_steps=step + 5, max_epochs=-1, enable_checkpointing=False)
        trainer.fit(soak_module(), soak_loader(), ckpt_path=ckpts / name)
        assert (start.step, trainer.global_step) == (step, step + 5), name
        assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())
