"""Loading a file never runs code from it (issue 9).

A checkpoint whose unpickling would create a file (a ``__reduce__`` payload) is refused by
``read_checkpoint``, ``load_lora_checkpoint`` and a Trainer resume through our checkpoint
IO, and the file is not created; ``trusted=True`` is the explicit opt-in (and the control
that shows the payload is real). Checkpoints the callback writes, with OmegaConf hparams
as the Hydra app passes them, load with the safe default. Adapter directories: only
safetensors by default; ``adapter_config.json`` validated field by field.
"""

from __future__ import annotations

import json
import warnings

import lightning as L
import pytest
import torch
from _helpers import randomize_adapters
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_lightning import (
    AdapterFileError,
    LoRACallback,
    LoRAConfig,
    UnsafeFileError,
    inject_lora,
    load_adapter,
    load_lora_checkpoint,
    lora_layers,
    read_adapter,
    read_checkpoint,
    save_adapter,
)

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = {"r": 2, "target_modules": ["fc1"], "modules_to_save": ["head"]}


class Payload:
    """Unpickling this calls ``open(path, "w")``: it creates ``path``."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class Module(L.LightningModule):
    def __init__(self, width: int = 8, net_cfg=None) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)  # the same base weights each time it is built
        self.fc1 = nn.Linear(4, width)
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        return self.head(torch.relu(self.fc1(x)))

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def loader():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def trainer(tmp_path, *callbacks, steps=2):
    return L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path,
                     callbacks=[LoRACallback(CONFIG, verbose=False), *callbacks])


@pytest.fixture
def saved(tmp_path):
    """A real checkpoint from the callback, with OmegaConf hparams like the Hydra app's."""
    torch.manual_seed(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)
    module = Module(net_cfg=OmegaConf.create({"depth": 2, "names": ["a", "b"]}))
    trainer(tmp_path, ckpt).fit(module, loader())
    return module, tmp_path / "ckpts" / "last.ckpt"


@pytest.fixture
def malicious(saved, tmp_path):
    """``saved`` with a payload added: (path, marker file the payload would create)."""
    _, path = saved
    marker = tmp_path / "pwned"
    data = torch.load(path, weights_only=False)
    data["extra"] = Payload(marker)
    bad = tmp_path / "malicious.ckpt"
    torch.save(data, bad)
    assert not marker.exists()
    return bad, marker


def test_the_callbacks_checkpoint_loads_with_the_safe_default(saved):
    module, path = saved
    assert isinstance(read_checkpoint(path)["hyper_parameters"]["net_cfg"], type(
        OmegaConf.create({})))
    loaded = load_lora_checkpoint(Module, path)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_read_checkpoint_refuses_the_payload_and_nothing_runs(malicious):
    path, marker = malicious
    with pytest.raises(UnsafeFileError, match=r"io\.open.*trusted=True") as info:
        read_checkpoint(path)
    assert info.value.refused == ["io.open"] and info.value.path == str(path)
    assert not marker.exists()


def test_load_lora_checkpoint_refuses_the_payload_and_nothing_runs(malicious):
    path, marker = malicious
    with pytest.raises(UnsafeFileError, match=r"io\.open"):
        load_lora_checkpoint(Module, path)
    assert not marker.exists()


def test_trainer_resume_through_our_checkpoint_io_refuses_the_payload(malicious, tmp_path):
    path, marker = malicious
    with pytest.raises(UnsafeFileError, match=r"io\.open"):
        trainer(tmp_path / "resume", steps=4).fit(Module(), loader(), ckpt_path=path)
    assert not marker.exists()


def test_trusted_is_the_explicit_opt_in_and_the_payload_is_real(malicious):
    """The control: the same file, trusted, does run its payload."""
    path, marker = malicious
    read_checkpoint(path, trusted=True)
    assert marker.exists()


def test_base_checkpoint_is_read_safely_too(malicious, saved):
    path, marker = malicious
    _, good = saved
    with pytest.raises(UnsafeFileError):
        load_lora_checkpoint(Module, good, base_checkpoint=path)
    assert not marker.exists()


# -- adapter directories --------------------------------------------------------------------
def _adapter(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    inject_lora(model, LoRAConfig(r=2, target_modules=["0"]))
    randomize_adapters(model, std=1.0)
    directory = tmp_path / "adapter"
    save_adapter(model, directory)
    return model, directory


def _fresh():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_a_pickled_adapter_needs_trusted(tmp_path):
    model, directory = _adapter(tmp_path)
    _, state = read_adapter(directory)
    tensors = json.loads((directory / "adapter_config.json").read_text())
    assert tensors["r"] == 2
    from safetensors.torch import load_file

    raw = load_file(str(directory / "adapter_model.safetensors"))
    (directory / "adapter_model.safetensors").unlink()
    torch.save(raw, directory / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match=r"adapter_model\.bin: a pickled adapter.*"
                                               r"trusted=True") as info:
        load_adapter(_fresh(), directory)
    assert info.value.path == str(directory / "adapter_model.bin")
    fresh = load_adapter(_fresh(), directory, trusted=True)
    x = torch.randn(3, 4)
    torch.testing.assert_close(fresh(x), model(x))


def _edit(directory, **fields):
    path = directory / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(("fields", "field", "pattern"), [
    ({"rank": 4}, "rank", r"unknown field\(s\) \['rank'\]"),
    ({"use_dora": "yes"}, "use_dora", r"field 'use_dora' is 'yes', expected true or false"),
    ({"inference_mode": 1}, "inference_mode", r"field 'inference_mode' is 1, expected bool"),
    ({"r": 0}, "r", r"invalid LoRA settings: LoRAConfig\.r: got 0.*file field 'r'"),
    ({"lora_alpha": "big"}, "lora_alpha", r"LoRAConfig\.alpha: got 'big'.*file field "
                                          r"'lora_alpha'"),
    ({"lora_dropout": 1.5}, "lora_dropout", r"LoRAConfig\.dropout: got 1\.5"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights", r"'pissa'.*change the base weights"),
    ({"eva_config": {"rho": 2.0}}, "eva_config", r"a PEFT feature lora-lightning does not"),
    # a rank above both sizes of fc1 (4 -> 8) and above 64; above the smaller size only is
    # allowed (with a warning), as in PEFT
    ({"r": 65, "rank_pattern": {}}, "r", r"rank 65, larger than the layer allows \(at most 64"),
])
def test_adapter_config_is_validated_field_by_field(tmp_path, fields, field, pattern):
    _, directory = _adapter(tmp_path)
    source = _edit(directory, **fields)
    model = _fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFileError, match=pattern) as info:
        load_adapter(model, directory)
    assert info.value.field == field and source in str(info.value)
    assert not lora_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_every_peft_lora_config_field_is_known():
    """A field PEFT adds later must be classified here, not silently ignored."""
    import dataclasses

    peft = pytest.importorskip("peft")
    from lora_lightning.io.peft_format import KNOWN_FIELDS

    theirs = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert theirs <= KNOWN_FIELDS, sorted(theirs - KNOWN_FIELDS)


# -- renamed public names keep working, with a warning ---------------------------------------
def test_old_save_spelling_warns_and_still_works():
    with pytest.warns(DeprecationWarning, match="save_mode"):
        callback = LoRACallback(CONFIG, save="full")
    assert callback.save_mode == "full"
    with pytest.warns(DeprecationWarning, match="save_mode"):
        assert callback.save == "full"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LoRACallback(CONFIG, save_mode="full").save_mode == "full"


def test_layer_lora_alpha_is_a_deprecated_spelling_of_alpha():
    model = nn.Sequential(nn.Linear(4, 4))
    inject_lora(model, LoRAConfig(r=2, alpha=6, target_modules=["0"]))
    assert model[0].alpha == 6
    with pytest.warns(DeprecationWarning, match=r"\.alpha"):
        assert model[0].lora_alpha == 6
