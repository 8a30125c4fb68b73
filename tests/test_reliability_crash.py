"""A training process killed at any moment loses at most the work since its last checkpoint.

Each run is a separate process (``_reliability_worker.run_child``) that is killed with a real
``SIGKILL``: at seeded random steps (mid-step, between steps, while a checkpoint is being
built), and halfway through writing a checkpoint or an adapter file. A new process then
resumes with ``ckpt_path="last"`` and must end bit-for-bit where an uninterrupted run ends
(adapter tensors within 1e-6, the same global step, optimizer step count and LR).
"""

from __future__ import annotations

import random

import pytest
import torch
from _reliability_worker import STEPS_PER_EPOCH, log_of, run_child

from lora_lightning import read_adapter, read_checkpoint

EPOCHS = 6
TOTAL = EPOCHS * STEPS_PER_EPOCH
SEED = 20250611


def kill_points(seed: int = SEED) -> list[tuple[int, str, int]]:
    """(global step, phase, step of the checkpoint a resume must start from), one per phase.

    ``before_step`` at step k: k optimizer steps done, batch k's gradients computed, its
    optimizer step not taken. ``after_step`` at k: the k-th optimizer step just taken.
    ``saving`` at k: the end-of-epoch checkpoint of step k is being built.
    """
    rng = random.Random(seed)
    first = STEPS_PER_EPOCH  # the first checkpoint: end of epoch 0
    k = rng.randrange(first, TOTAL)
    points = [(k, "before_step", k // STEPS_PER_EPOCH * STEPS_PER_EPOCH)]
    k = rng.randrange(first + 1, TOTAL)
    points.append((k, "after_step", (k - 1) // STEPS_PER_EPOCH * STEPS_PER_EPOCH))
    k = rng.randrange(2, EPOCHS) * STEPS_PER_EPOCH
    points.append((k, "saving", k - STEPS_PER_EPOCH))
    return points


KILL_POINTS = kill_points()
print(f"kill points (seed {SEED}): {KILL_POINTS}")


def spec(root, name, **kwargs):
    return {"root": str(root), "name": name, "kind": "train", "epochs": EPOCHS, **kwargs}


def run_ok(s):
    code, result = run_child(s)
    assert code == 0 and result is not None, log_of(s)
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run, shared by every resume below."""
    result = run_ok(spec(tmp_path_factory.mktemp("reference"), "reference"))
    assert result["global_step"] == TOTAL and result["steps_here"] == TOTAL
    assert result["adam_steps"] == [TOTAL]
    return result


def assert_same_as_reference(resumed, reference, start: int) -> float:
    """Returns the largest adapter difference, for the record."""
    assert resumed["start_step"] == start
    assert resumed["steps_here"] == TOTAL - start  # optimizer steps taken after the resume
    assert resumed["global_step"] == reference["global_step"] == TOTAL
    assert resumed["adam_steps"] == reference["adam_steps"] == [TOTAL]
    assert resumed["lr"] == pytest.approx(reference["lr"], rel=1e-12)
    assert resumed["adapters"].keys() == reference["adapters"].keys()
    for key, want in reference["adapters"].items():
        torch.testing.assert_close(resumed["adapters"][key], want, atol=1e-6, rtol=0, msg=key)
    return max((resumed["adapters"][k] - v).abs().max().item()
               for k, v in reference["adapters"].items())


def assert_every_checkpoint_loads(ckpts) -> None:
    files = sorted(ckpts.glob("*.ckpt"))
    assert any(f.name == "last.ckpt" for f in files), files
    for f in files:
        read_checkpoint(f)  # verifies every archive member's CRC, then unpickles


@pytest.mark.parametrize(("step", "phase", "start"), KILL_POINTS,
                         ids=[f"{p}@{k}" for k, p, _ in KILL_POINTS])
def test_sigkill_then_resume_from_last_matches_an_uninterrupted_run(
    tmp_path, reference, step, phase, start
):
    killed = spec(tmp_path, "killed", stall={"step": step, "phase": phase})
    code, result = run_child(killed)
    assert code == -9 and result is None, log_of(killed)
    assert_every_checkpoint_loads(tmp_path / "ckpts")
    assert read_checkpoint(tmp_path / "ckpts" / "last.ckpt")["global_step"] == start

    resumed = run_ok(spec(tmp_path, "resumed", resume=True))
    assert resumed["resumed_from"].endswith("last.ckpt")
    diff = assert_same_as_reference(resumed, reference, start)
    print(f"killed {phase} at step {step}: resumed from step {start}, "
          f"{resumed['steps_here']} more optimizer steps, max adapter diff {diff:.1e}")


@pytest.mark.parametrize("fault", ["kill_in_ckpt_write", "kill_in_cross_device_copy"])
def test_killed_while_writing_last_ckpt_keeps_the_previous_one(tmp_path, reference, fault):
    """SIGKILL halfway through the bytes of the second ``last.ckpt`` (end of epoch 1):
    written in place, or copied in from the temp dir on another filesystem."""
    killed = spec(tmp_path, "killed", fault=fault, nth=2)
    code, result = run_child(killed)
    assert code == -9 and result is None, log_of(killed)
    ckpts = tmp_path / "ckpts"
    assert_every_checkpoint_loads(ckpts)
    assert read_checkpoint(ckpts / "last.ckpt")["global_step"] == STEPS_PER_EPOCH
    assert not [p for p in ckpts.iterdir() if p.name.startswith("last") and p.name != "last.ckpt"]

    resumed = run_ok(spec(tmp_path, "resumed", resume=True))
    diff = assert_same_as_reference(resumed, reference, STEPS_PER_EPOCH)
    print(f"{fault}: last.ckpt still step {STEPS_PER_EPOCH}; max adapter diff {diff:.1e}")


@pytest.mark.parametrize("fault", ["kill_in_adapter_weights", "kill_in_adapter_config"])
def test_killed_while_saving_an_adapter_keeps_the_old_adapter(tmp_path, fault):
    s = {"root": str(tmp_path), "name": "adapter", "kind": "adapter_save", "fault": fault}
    code, result = run_child(s)
    assert code == -9 and result is None, log_of(s)
    old = torch.load(tmp_path / "old_adapter.pt")
    _, state = read_adapter(tmp_path / "adapter")
    assert state.keys() == old.keys()
    for key, value in old.items():
        assert torch.equal(state[key], value), key
    visible = sorted(p.name for p in (tmp_path / "adapter").iterdir() if not p.name.startswith("."))
    assert visible == ["adapter_config.json", "adapter_model.safetensors", "lora_lightning.json"]
