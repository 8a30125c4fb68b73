"""Damaged, foreign and ill-fitting checkpoints are refused with one clear error, and the
model is left exactly as it was.

Each kind of file (adapter-only and full Lightning checkpoints) is damaged in each way
(empty, truncated at the head, middle and tail, garbage, one flipped bit in tensor data or
in the pickle, a valid file that is not a checkpoint) and loaded both with
``load_lora_checkpoint`` and with ``trainer.fit(ckpt_path=...)``. Adapter directories with
a missing or garbled ``adapter_config.json`` or truncated weights are covered, with the same
"names the file, model unchanged" assertions, by ``test_adapter_io.py::
test_file_errors_name_the_file_and_leave_model_unchanged``.
"""

from __future__ import annotations

import struct
import zipfile

import pytest
import torch
from _reliability_worker import CONFIG, Module, clone_state, loader, lora, make_trainer

from lora_lightning import (
    AdapterLoadError,
    CheckpointMismatchError,
    CheckpointReadError,
    LoRACallback,
    LoRAConfig,
    inject_lora,
    load_lora_checkpoint,
)
from lora_lightning.errors import StateDictMismatchError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One trained epoch, saved adapter-only and full: {"adapter": path, "full": path}."""
    root = tmp_path_factory.mktemp("saved")
    paths = {}
    for save in ("adapter", "full"):
        trainer = make_trainer(root, lora(save=save), enable_checkpointing=False)
        trainer.fit(Module(), loader())
        paths[save] = root / f"{save}.ckpt"
        trainer.save_checkpoint(paths[save])
    return paths


def _member_offset(raw: bytes, path, name: str) -> int:
    """Byte offset of the middle of archive member ``name``'s data."""
    info = zipfile.ZipFile(path).getinfo(name)
    n, extra = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + n + extra + info.file_size // 2


def _flip(raw: bytes, at: int) -> bytes:
    out = bytearray(raw)
    out[at] ^= 0x10
    return bytes(out)


def _tensor_member(path) -> str:
    return max((i for i in zipfile.ZipFile(path).infolist() if "/data/" in i.filename),
               key=lambda i: i.file_size).filename


DAMAGES = {
    # name: (damage(raw bytes, path) -> bytes, what the message must say)
    "empty": (lambda raw, p: b"", "unreadable .*not a complete zip archive"),
    "head_only": (lambda raw, p: raw[:200], "unreadable .*not a complete zip archive"),
    "half": (lambda raw, p: raw[: len(raw) // 2], "unreadable .*not a complete zip archive"),
    "tail_cut": (lambda raw, p: raw[:-30], "unreadable .*not a complete zip archive"),
    "garbage": (lambda raw, p: bytes(torch.randint(0, 256, (len(raw),),
                                                   generator=torch.Generator().manual_seed(0))
                                     .to(torch.uint8).tolist()), "unreadable .*zip archive"),
    "bitflip_tensor": (lambda raw, p: _flip(raw, _member_offset(raw, p, _tensor_member(p))),
                       "fails its CRC-32 check"),
    "bitflip_pickle": (lambda raw, p: _flip(raw, _member_offset(raw, p, "archive/data.pkl")),
                       "fails its CRC-32 check"),
}


def damaged(saved, kind, damage, tmp_path):
    src = saved[kind]
    bad = tmp_path / f"{kind}-{damage}.ckpt"
    if damage == "not_a_checkpoint":
        torch.save([1, 2, 3], bad)
        return bad, "holds a list, not a checkpoint dict"
    fn, message = DAMAGES[damage]
    bad.write_bytes(fn(src.read_bytes(), src))
    return bad, message


ALL_DAMAGES = [*DAMAGES, "not_a_checkpoint"]


def injected_module() -> tuple[Module, dict[str, torch.Tensor]]:
    """A module with fresh adapters already in place (the callback's injection is then a
    no-op), and a copy of every tensor it holds."""
    module = Module()
    inject_lora(module, CONFIG)
    return module, clone_state(module)


def assert_unchanged(module, before) -> None:
    after = clone_state(module)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed by a refused load"


@pytest.mark.parametrize("damage", ALL_DAMAGES)
@pytest.mark.parametrize("kind", ["adapter", "full"])
def test_load_lora_checkpoint_names_the_damaged_file(saved, tmp_path, kind, damage):
    bad, message = damaged(saved, kind, damage, tmp_path)
    with pytest.raises(CheckpointReadError, match=message) as info:
        load_lora_checkpoint(Module, bad)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("damage", ALL_DAMAGES)
@pytest.mark.parametrize("kind", ["adapter", "full"])
def test_fit_resume_names_the_damaged_file_and_changes_nothing(saved, tmp_path, kind, damage):
    bad, message = damaged(saved, kind, damage, tmp_path)
    module, before = injected_module()
    with pytest.raises(CheckpointReadError, match=message) as info:
        make_trainer(tmp_path, lora(save=kind), max_epochs=2, enable_checkpointing=False).fit(
            module, loader(), ckpt_path=bad)
    assert str(bad) in str(info.value)
    assert "weights_only" not in str(info.value)  # torch's advice for intact files only
    assert_unchanged(module, before)


def _drop(key):
    def edit(sd):
        del sd[key]
    return edit


def _reshape(key):
    def edit(sd):
        sd[key] = torch.zeros(*sd[key].shape[:-1], sd[key].shape[-1] + 1)
    return edit


def _add(key):
    def edit(sd):
        sd[key] = torch.zeros(2)
    return edit


def _not_tensor(key):
    def edit(sd):
        sd[key] = [0.0, 1.0]
    return edit


# (edit of the saved state dict, error type, what the message must name)
MISFITS = {
    "missing_trained_bias": (_drop("net.head.bias"), StateDictMismatchError,
                             r"missing keys \['net\.head\.bias'\]"),
    "missing_adapter": (_drop("net.fc2.lora_B"), AdapterLoadError, r"net\.fc2\.lora_B"),
    "wrong_shape": (_reshape("net.head.weight"), StateDictMismatchError,
                    r"size mismatch for 'net\.head\.weight'"),
    "unexpected_key": (_add("net.extra"), StateDictMismatchError, r"unexpected keys \['net\.extra'\]"),
    "not_a_tensor": (_not_tensor("net.fc1.lora_A"), StateDictMismatchError,
                     r"'net\.fc1\.lora_A' is a list, not a tensor"),
}


@pytest.mark.parametrize("kind", ["adapter", "full"])
@pytest.mark.parametrize("misfit", list(MISFITS))
def test_a_checkpoint_that_does_not_fit_loads_nothing(saved, tmp_path, kind, misfit):
    """Torch's strict load copies every tensor that fits before it raises; ours refuses first."""
    edit, error, message = MISFITS[misfit]
    ckpt = torch.load(saved[kind], weights_only=False)
    edit(ckpt["state_dict"])
    bad = tmp_path / "misfit.ckpt"
    torch.save(ckpt, bad)
    module, before = injected_module()
    with pytest.raises(error, match=message) as info:
        make_trainer(tmp_path, lora(save=kind), max_epochs=2, enable_checkpointing=False).fit(
            module, loader(), ckpt_path=bad)
    assert f"checkpoint {str(bad)!r}" in str(info.value)
    assert_unchanged(module, before)
    if error is StateDictMismatchError:
        assert isinstance(error("x"), RuntimeError)  # what torch's strict load raised before


# -- 4. another rank, targets, alpha, DoRA, rsLoRA or bias -----------------------------------
OTHER = {
    "rank": ({"r": 4}, "different rank"),
    "targets": ({"target_modules": ["fc1"]}, "different target modules"),
    "alpha": ({"alpha": 8.0}, "different alpha: checkpoint 4.0, model 8.0"),
    "dora": ({"use_dora": True}, "different use_dora: checkpoint False, model True"),
    "rslora": ({"use_rslora": True}, "different use_rslora: checkpoint False, model True"),
    "bias": ({"bias": "all"}, "different bias: checkpoint 'none', model 'all'"),
}


@pytest.mark.parametrize("change", list(OTHER))
def test_a_checkpoint_for_another_lora_setup_is_refused_naming_the_difference(
    saved, tmp_path, change
):
    fields, message = OTHER[change]
    config = LoRAConfig(**{**CONFIG.to_dict(), **fields})
    module = Module()
    inject_lora(module, config)
    before = clone_state(module)
    with pytest.raises(CheckpointMismatchError, match=message) as info:
        make_trainer(tmp_path, LoRACallback(config, verbose=False), max_epochs=2,
                     enable_checkpointing=False).fit(module, loader(), ckpt_path=saved["adapter"])
    assert f"checkpoint {str(saved['adapter'])!r} does not fit" in str(info.value)
    assert "different base model" not in str(info.value)  # the base is the same
    assert_unchanged(module, before)
    with pytest.raises(CheckpointMismatchError, match=message):
        load_lora_checkpoint(Module, saved["adapter"], config=config)
