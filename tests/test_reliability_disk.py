"""A full disk or an unwritable checkpoint directory fails the save with an error naming the
file, and loses nothing: the model in memory is intact and the previous files still load.

Running as root, ``chmod`` cannot make a directory unwritable, so the faults are: a write
that raises ``ENOSPC`` (monkeypatched at the file-write layer Lightning and safetensors use),
a checkpoint directory below a regular file (``mkdir`` fails), and, in a separate process,
the kernel itself failing writes past ``RLIMIT_FSIZE`` with ``EFBIG`` halfway through a file.
"""

from __future__ import annotations

import errno
import json

import pytest
import torch
from _reliability_worker import (
    CONFIG,
    STEPS_PER_EPOCH,
    Module,
    Net,
    clone_state,
    loader,
    log_of,
    lora,
    make_trainer,
    run_child,
)
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from lora_lightning import (
    adapter_state_dict,
    inject_lora,
    load_lora_checkpoint,
    read_adapter,
    read_checkpoint,
    save_adapter,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class SnapshotAtEpochEnd(Callback):
    """The module's state when ModelCheckpoint (which Lightning runs last) starts saving."""

    def on_train_epoch_end(self, trainer, pl_module):
        self.state = clone_state(pl_module)
        self.step = trainer.global_step


def assert_states_equal(got, want) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def _enospc_from_the_second_epoch(monkeypatch):
    from fsspec.implementations.local import LocalFileOpener

    real = LocalFileOpener.write
    calls = {"n": 0}

    def write(self, data, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # epoch 0 writes its top-k file and last.ckpt
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(LocalFileOpener, "write", write)


def test_disk_full_during_fit_names_the_file_and_keeps_model_and_last_checkpoint(
    tmp_path, monkeypatch
):
    _enospc_from_the_second_epoch(monkeypatch)
    ckpts = tmp_path / "ckpts"
    module, snap = Module(), SnapshotAtEpochEnd()
    checkpoint = ModelCheckpoint(dirpath=ckpts, save_last=True, every_n_epochs=1)
    trainer = make_trainer(tmp_path, lora(), snap, checkpoint, max_epochs=3)
    with pytest.raises(OSError, match="No space left on device") as info:
        trainer.fit(module, loader())
    print(f"fit, disk full: {type(info.value).__name__}: {info.value}")
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(ckpts / "epoch=1-step=8.ckpt")
    assert snap.step == 2 * STEPS_PER_EPOCH
    assert_states_equal(clone_state(module), snap.state)  # the failed save changed nothing
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert read_checkpoint(ckpts / "last.ckpt")["global_step"] == STEPS_PER_EPOCH
    monkeypatch.undo()
    # The in-memory model saves fine once there is room, and the old last.ckpt resumes.
    trainer.save_checkpoint(tmp_path / "rescued.ckpt")
    rescued = load_lora_checkpoint(Module, tmp_path / "rescued.ckpt")
    assert_states_equal(clone_state(rescued), snap.state)
    resumed = make_trainer(tmp_path, lora(), max_epochs=3, enable_checkpointing=False)
    resumed.fit(Module(), loader(), ckpt_path=ckpts / "last.ckpt")
    assert resumed.global_step == 3 * STEPS_PER_EPOCH


def test_checkpoint_dir_below_a_regular_file_names_the_path(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a regular file")
    checkpoint = ModelCheckpoint(dirpath=blocker / "ckpts", save_last=True)
    module = Module()
    with pytest.raises(OSError) as info:
        make_trainer(tmp_path, lora(), checkpoint, max_epochs=1).fit(module, loader())
    print(f"fit, dir below a file: {type(info.value).__name__}: {info.value}")
    assert str(blocker) in str(info.value)
    assert blocker.read_text() == "a regular file"


def test_kernel_write_failure_midway_efbig(tmp_path):
    """Real partial writes: past RLIMIT_FSIZE (half the previous file's size) the kernel
    fails them with EFBIG. In a child, as the limit covers every file the process writes."""
    spec = {"root": str(tmp_path), "name": "efbig", "kind": "file_too_large"}
    code, out = run_child(spec)
    assert code == 0 and out is not None, log_of(spec)
    ckpts = tmp_path / "ckpts"
    print(f"fit, EFBIG: {out['fit_error']}\nsave_adapter, EFBIG: {out['adapter_error']}")
    assert out["fit_error"].startswith("OSError: [Errno 27] File too large"), out["fit_error"]
    assert str(ckpts / "epoch=1-step=8.ckpt") in out["fit_error"]
    assert_states_equal(out["state_after"], out["state_at_save"])
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert read_checkpoint(ckpts / "last.ckpt")["global_step"] == STEPS_PER_EPOCH
    assert read_checkpoint(ckpts / "epoch=0-step=4.ckpt")["global_step"] == STEPS_PER_EPOCH

    assert out["adapter_error"].startswith("OSError: "), out["adapter_error"]
    assert str(tmp_path / "adapter" / "adapter_model.safetensors") in out["adapter_error"]
    _, state = read_adapter(tmp_path / "adapter")
    assert_states_equal(state, out["adapter_before"])
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors",
        "lora_lightning.json"]


# -- save_adapter ---------------------------------------------------------------------------
def _adapter_model(shift: float) -> Net:
    model = Net()
    inject_lora(model, CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(shift)
    return model


@pytest.mark.parametrize("failing", ["adapter_model.safetensors", "adapter_config.json",
                                     "lora_lightning.json"])
def test_save_adapter_on_a_full_disk_names_the_file_and_keeps_the_old_adapter(
    tmp_path, monkeypatch, failing
):
    import pathlib

    import safetensors.torch

    directory = tmp_path / "adapter"
    old = _adapter_model(0.1)
    save_adapter(old, directory)
    old_config = (directory / "adapter_config.json").read_text()
    new = _adapter_model(0.7)
    if failing == "adapter_model.safetensors":
        def save_file(tensors, filename, *args, **kwargs):
            with open(filename, "wb") as f:
                f.write(b"\0" * 64)  # some bytes landed before the disk filled up
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    else:
        real_write_text = pathlib.Path.write_text

        def write_text(self, data, *args, **kwargs):
            if failing in self.name:  # the temporary beside it: .<name>.<pid>...partial
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write_text(self, data, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    with pytest.raises(OSError, match="No space left on device") as info:
        save_adapter(new, directory)
    monkeypatch.undo()
    print(f"save_adapter, disk full in {failing}: {type(info.value).__name__}: {info.value}")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(directory / failing)
    assert sorted(p.name for p in directory.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors",
        "lora_lightning.json"]  # no temporary files left
    assert (directory / "adapter_config.json").read_text() == old_config
    _, state = read_adapter(directory)
    assert_states_equal(state, adapter_state_dict(old))
    assert json.loads(old_config)["r"] == CONFIG.r


def test_save_adapter_below_a_regular_file_names_the_path(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with pytest.raises(OSError) as info:
        save_adapter(_adapter_model(0.1), blocker / "adapter")
    print(f"save_adapter, dir below a file: {type(info.value).__name__}: {info.value}")
    assert str(blocker) in str(info.value)
