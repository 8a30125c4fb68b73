"""End-to-end tests of LoRACallback checkpoints with a real Trainer (CPU, fp32).

Adapter-only and full checkpoints, exact resume with ``fit(ckpt_path=...)``, starting from
a base checkpoint without LoRA, refusals of checkpoints made for another model,
``save_weights_only`` and ``load_lora_checkpoint``.
"""

from __future__ import annotations

import copy
import logging
import os

import lightning as L
import pytest
import torch
from _helpers import assert_close_fp32
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_lightning import (
    CheckpointMismatchError,
    CheckpointReadError,
    LoRACallback,
    LoRAConfig,
    base_fingerprint,
    load_lora_checkpoint,
    lora_layers,
)

CONFIG = LoRAConfig(r=2, target_modules=["fc1", "fc2"], modules_to_save=["head"], bias="lora_only")
# Trained tensors (adapters, the lora_only biases, the modules_to_save head) and buffers.
ADAPTER_KEYS = {
    "net.fc1.lora_A",
    "net.fc1.lora_B",
    "net.fc1.bias",
    "net.fc2.lora_A",
    "net.fc2.lora_B",
    "net.fc2.bias",
    "net.head.weight",
    "net.head.bias",
    "net.bn.running_mean",
    "net.bn.running_var",
    "net.bn.num_batches_tracked",
}
FROZEN_KEYS = {"net.fc1.weight", "net.fc2.weight", "net.bn.weight", "net.bn.bias"}
STEPS_PER_EPOCH = 4


pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.bn(self.fc1(x))))))


class Mod(L.LightningModule):
    """Builds its network in ``__init__``, ``setup`` or ``configure_model`` (``style``)."""

    def __init__(self, style: str = "init", seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net: Net | None = None
        self.before_load: dict[str, torch.Tensor] | None = None
        if style == "init":
            self._build()

    def _build(self) -> None:
        torch.manual_seed(self.hparams.seed)
        self.net = Net()

    def setup(self, stage: str) -> None:
        if self.hparams.style == "setup" and self.net is None:
            self._build()

    def configure_model(self) -> None:
        if self.hparams.style == "configure_model" and self.net is None:
            self._build()

    def on_load_checkpoint(self, checkpoint) -> None:
        # Runs first inside the callback's load hook: the state just before any loading.
        self.before_load = clone_state(self)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.training_step(batch, batch_idx))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self.training_step(batch, batch_idx))

    def predict_step(self, batch, batch_idx):
        return self.net(batch[0])

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


class Probe(Callback):
    """Records the state at train start (after every checkpoint restore)."""

    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step
        self.state = clone_state(pl_module)
        self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())
        self.adapters = dict(adapter_params(pl_module))


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def adapter_params(module: nn.Module):
    for name, layer in lora_layers(module).items():
        for p in layer.adapter_param_names():
            yield f"{name}.{p}", getattr(layer, p)


def data(n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16, shuffle=False)


def trainer(root, epochs: int, *callbacks: Callback, **kwargs) -> L.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=list(callbacks),
        **kwargs,
    )


def lora(config: LoRAConfig = CONFIG, **kwargs) -> LoRACallback:
    return LoRACallback(config, verbose=False, **kwargs)


def assert_states_close(got, want, atol: float = 1e-6) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[key], value, atol=atol, rtol=0, msg=key)
        else:
            assert torch.equal(got[key], value), key


def assert_optimizer_states_equal(got: dict, want: dict) -> None:
    assert got["state"].keys() == want["state"].keys() and want["state"]
    for idx, slots in want["state"].items():
        assert got["state"][idx].keys() == slots.keys()
        for slot, value in slots.items():
            assert torch.equal(torch.as_tensor(got["state"][idx][slot]), torch.as_tensor(value))
    assert [g["lr"] for g in got["param_groups"]] == [g["lr"] for g in want["param_groups"]]


def train_and_save(root, epochs=2, style="init", callback=None, name="run.ckpt"):
    module = Mod(style)
    t = trainer(root, epochs, callback or lora())
    t.fit(module, data())
    path = root / name
    t.save_checkpoint(path)
    return module, path


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def inputs() -> torch.Tensor:
    return torch.randn(16, 8, generator=torch.Generator().manual_seed(1))


# -- 1. what an adapter-only checkpoint holds ---------------------------------------------
def test_adapter_checkpoint_holds_trained_tensors_buffers_and_metadata(tmp_path):
    module, path = train_and_save(tmp_path, epochs=1)
    ckpt = load(path)
    assert set(ckpt["state_dict"]) == ADAPTER_KEYS
    assert set(module.state_dict()) == ADAPTER_KEYS | FROZEN_KEYS
    assert ckpt["state_dict"]["net.bn.num_batches_tracked"].item() == STEPS_PER_EPOCH
    meta = ckpt["lora_lightning"]
    assert meta["mode"] == "adapter"
    assert meta["config"] == CONFIG.to_dict()
    assert meta["injected"] == ["net.fc1", "net.fc2"]
    assert meta["fingerprint"] == base_fingerprint(module)


def test_full_checkpoint_keeps_every_key(tmp_path):
    module, path = train_and_save(tmp_path, epochs=1, callback=lora(save="full"))
    ckpt = load(path)
    assert set(ckpt["state_dict"]) == ADAPTER_KEYS | FROZEN_KEYS
    assert_states_close(ckpt["state_dict"], clone_state(module), atol=0)
    assert ckpt["lora_lightning"]["mode"] == "full"


def test_adapter_checkpoint_of_minilm_is_under_5_percent_of_full(tmp_path):
    from lora_lightning.examples.classification.module import ClassifierModule
    from lora_lightning.examples.classification.text import MiniLMClassifier

    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 2000, (2, 8), generator=g),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
        "labels": torch.tensor([0, 1]),
    }
    config = LoRAConfig(r=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    sizes = {}
    for mode in ("adapter", "full"):
        torch.manual_seed(0)
        module = ClassifierModule(MiniLMClassifier(num_classes=2), lr=1e-3)
        t = trainer(tmp_path, 1, lora(config, save=mode), max_steps=1)
        t.fit(module, DataLoader([batch], batch_size=None))
        path = tmp_path / f"{mode}.ckpt"
        t.save_checkpoint(path)
        sizes[mode] = path.stat().st_size
        keys = set(load(path)["state_dict"])
        if mode == "adapter":
            trained = {n for n, p in module.named_parameters() if p.requires_grad}
            buffers = {n for n, _ in module.named_buffers()}
            assert len(trained) == 6 * 2 * 2 + 2  # A and B for 12 layers, classifier w and b
            assert trained <= keys <= trained | buffers
        else:
            assert keys == set(module.state_dict())
    assert sizes["adapter"] < 0.05 * sizes["full"], sizes


# -- 2./3. exact resume -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("style", "save"),
    [("init", "adapter"), ("init", "full"), ("setup", "adapter"), ("configure_model", "adapter")],
)
def test_fit_resumes_exactly_from_checkpoint(tmp_path, style, save):
    reference = Mod(style)
    trainer(tmp_path, 4, lora(save=save)).fit(reference, data())

    _, path = train_and_save(tmp_path, epochs=2, style=style, callback=lora(save=save))
    saved = load(path)
    assert saved["lora_lightning"]["mode"] == save

    resumed, probe = Mod(style), Probe()
    t = trainer(tmp_path, 4, lora(save=save), probe)
    t.fit(resumed, data(), ckpt_path=path)

    assert probe.step == 2 * STEPS_PER_EPOCH
    assert t.global_step == 4 * STEPS_PER_EPOCH == reference.trainer.global_step
    assert_optimizer_states_equal(probe.optimizer, saved["optimizer_states"][0])
    for key, value in saved["state_dict"].items():  # restored tensors and buffers
        assert torch.equal(probe.state[key], value), key
    assert_states_close(clone_state(resumed), clone_state(reference))


@pytest.mark.parametrize("key", ["net.bn.running_mean", "net.head.weight", "net.fc1.lora_A"])
def test_strict_load_still_catches_a_missing_key(tmp_path, key):
    _, path = train_and_save(tmp_path, epochs=1)
    ckpt = load(path)
    del ckpt["state_dict"][key]
    broken = tmp_path / "missing.ckpt"
    torch.save(ckpt, broken)
    with pytest.raises(Exception, match=key.replace(".", r"\.")):
        trainer(tmp_path, 2, lora()).fit(Mod(), data(), ckpt_path=broken)


def test_strict_load_still_catches_an_unexpected_key(tmp_path):
    _, path = train_and_save(tmp_path, epochs=1)
    ckpt = load(path)
    ckpt["state_dict"]["net.bogus"] = torch.zeros(3)
    broken = tmp_path / "bogus.ckpt"
    torch.save(ckpt, broken)
    with pytest.raises(RuntimeError, match=r"net\.bogus"):
        trainer(tmp_path, 2, lora()).fit(Mod(), data(), ckpt_path=broken)


# -- 4. start from a base checkpoint without LoRA -----------------------------------------
def base_run(root) -> tuple[Mod, object]:
    """A plain Lightning run without the callback: every weight trains."""
    base = Mod()
    t = trainer(root, 1)
    t.fit(base, data())
    path = root / "base.ckpt"
    t.save_checkpoint(path)
    return base, path


def test_fit_from_base_checkpoint_reconciles_only_adapter_keys(tmp_path, caplog):
    _, base_path = base_run(tmp_path)
    base_state = load(base_path)["state_dict"]
    assert not any("lora_" in k for k in base_state)

    module, probe, callback = Mod(), Probe(), lora()
    hub = logging.getLogger("lightning.pytorch")
    hub.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO):
            t = trainer(tmp_path, 2, callback, probe)
            t.fit(module, data(), ckpt_path=base_path)
    finally:
        hub.removeHandler(caplog.handler)

    assert "reconciled 4 adapter key(s)" in caplog.text
    # the base run's optimizer moments belong to other tensors: the optimizer starts fresh
    assert "optimizer" in caplog.text and probe.optimizer["state"] == {}
    assert probe.step == STEPS_PER_EPOCH and t.global_step == 2 * STEPS_PER_EPOCH
    for key, value in base_state.items():
        assert torch.equal(probe.state[key], value), key
    assert set(probe.state) - set(base_state) == {k for k, _ in adapter_params(module)}
    assert all(not probe.state[k].any() for k in ("net.fc1.lora_B", "net.fc2.lora_B"))
    # the frozen base weights stay the base checkpoint's after training
    for key in FROZEN_KEYS:
        assert torch.equal(module.state_dict()[key], base_state[key]), key


# -- 5. refusals --------------------------------------------------------------------------
def _other_rank(module):
    return lora(LoRAConfig(**{**CONFIG.to_dict(), "r": 4})), "different rank"


def _other_targets(module):
    return lora(LoRAConfig(**{**CONFIG.to_dict(), "target_modules": ["fc1"]})), (
        "different target modules"
    )


def _other_base(module):
    with torch.no_grad():
        module.net.fc2.weight.add_(0.5)
    return lora(), "different base model"


@pytest.mark.parametrize("change", [_other_rank, _other_targets, _other_base])
def test_refuses_a_checkpoint_for_another_model_and_loads_nothing(tmp_path, change):
    _, path = train_and_save(tmp_path, epochs=1)
    module = Mod()
    callback, message = change(module)
    with pytest.raises(CheckpointMismatchError, match=message):
        trainer(tmp_path, 2, callback).fit(module, data(), ckpt_path=path)
    assert module.before_load is not None
    assert_states_close(clone_state(module), module.before_load, atol=0)
    assert not module.net.fc1.lora_B.any()


# -- 6. save_weights_only -----------------------------------------------------------------
def test_save_weights_only_model_checkpoint_is_adapter_only_and_loads(tmp_path):
    module = Mod()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpts", filename="w", save_weights_only=True)
    trainer(tmp_path, 1, lora(), ckpt_cb, enable_checkpointing=True).fit(module, data())
    path = tmp_path / "ckpts" / "w.ckpt"
    ckpt = load(path)
    assert "optimizer_states" not in ckpt
    assert set(ckpt["state_dict"]) == ADAPTER_KEYS
    assert ckpt["lora_lightning"]["mode"] == "adapter"
    assert ckpt["lora_lightning"]["injected"] == ["net.fc1", "net.fc2"]
    assert ckpt["lora_lightning"]["fingerprint"] == base_fingerprint(module)
    loaded = load_lora_checkpoint(Mod, path)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs()), module(inputs()), atol=0, rtol=0)


# -- 7. load_lora_checkpoint --------------------------------------------------------------
@pytest.mark.parametrize("save", ["adapter", "full"])
@pytest.mark.parametrize("merge", [False, True])
def test_load_lora_checkpoint_reproduces_the_trained_module(tmp_path, save, merge):
    module, path = train_and_save(tmp_path, epochs=1, callback=lora(save=save))
    loaded = load_lora_checkpoint(Mod, path, merge=merge)
    assert isinstance(loaded, Mod) and not loaded.training
    assert set(lora_layers(loaded)) == {"net.fc1", "net.fc2"}
    assert all(m.merged == merge for m in lora_layers(loaded).values())
    module.eval()
    with torch.no_grad():
        want = module(inputs())
        got = loaded(inputs())
    if merge:  # merged weights: another computation, equal up to rounding
        assert_close_fp32(got, want)
    else:  # the same tensors, loaded back, through the same forward
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_load_lora_checkpoint_takes_base_weights_from_base_checkpoint(tmp_path):
    _, base_path = base_run(tmp_path)  # trained base: the constructor no longer makes it
    module = Mod()
    t = trainer(tmp_path, 2, lora())
    t.fit(module, data(), ckpt_path=base_path)
    path = tmp_path / "lora.ckpt"
    t.save_checkpoint(path)

    with pytest.raises(CheckpointMismatchError, match="different base model") as info:
        load_lora_checkpoint(Mod, path)
    assert "base_checkpoint=" in str(info.value)  # the fix, when the base came from elsewhere
    loaded = load_lora_checkpoint(Mod, path, base_checkpoint=base_path, seed=7)
    assert loaded.hparams.seed == 7
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs()), module(inputs()), atol=0, rtol=0)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_load_lora_checkpoint_names_a_damaged_file(tmp_path, damage):
    _, path = train_and_save(tmp_path, epochs=1)
    raw = path.read_bytes()
    bad = tmp_path / f"{damage}.ckpt"
    bad.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"not a checkpoint" * 8)
    with pytest.raises(CheckpointReadError, match=f"{damage}.ckpt"):
        load_lora_checkpoint(Mod, bad)


# -- a killed save's leftovers ------------------------------------------------------------
def test_next_save_removes_a_stale_partial_of_a_killed_save(tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    other_pid = os.getpid() + 1
    stale = ckpts / f".last.ckpt.{other_pid}.partial"
    stale.write_bytes(b"half a checkpoint")  # left by a run killed mid-save
    unrelated = ckpts / f".other.ckpt.{other_pid}.partial"
    unrelated.write_bytes(b"not ours to remove")
    ckpt_cb = ModelCheckpoint(dirpath=ckpts, save_last=True, every_n_train_steps=1)
    trainer(tmp_path, 1, lora(), ckpt_cb, enable_checkpointing=True, max_steps=2).fit(
        Mod(), data())
    assert (ckpts / "last.ckpt").is_file()
    assert not stale.exists()
    assert not list(ckpts.glob(f".last.ckpt.{os.getpid()}.partial"))  # ours renamed away
    assert unrelated.exists()  # only partials of the file just saved are stale


# -- injection across stages and fits -----------------------------------------------------
def test_injection_is_idempotent_across_stages_and_a_second_fit(tmp_path):
    module, callback = Mod(), lora()
    t = trainer(tmp_path, 1, callback)
    t.fit(module, data())
    params = dict(adapter_params(module))
    values = {k: p.detach().clone() for k, p in params.items()}
    assert values["net.fc1.lora_B"].any()
    report = callback.report

    def unchanged():
        now = dict(adapter_params(module))
        assert now.keys() == params.keys()
        for k, p in now.items():
            assert p is params[k], k
            assert torch.equal(p, values[k]), k

    t.validate(module, data())
    unchanged()
    t.test(module, data())
    unchanged()
    t.predict(module, data())
    unchanged()
    assert callback.report is report and report.injected == ["net.fc1", "net.fc2"]

    probe = Probe()
    second = trainer(tmp_path, 1, lora(save="full"), probe)
    second.fit(module, data())
    assert all(probe.adapters[k] is p for k, p in params.items())
    for k, v in values.items():
        assert torch.equal(probe.state[k], v), k
    assert not torch.equal(params["net.fc1.lora_B"], values["net.fc1.lora_B"])  # trained on
    path = tmp_path / "second.ckpt"
    second.save_checkpoint(path)
    ckpt = load(path)
    assert ckpt["lora_lightning"]["mode"] == "full"  # the second fit's callback decides
    assert set(ckpt["state_dict"]) == ADAPTER_KEYS | FROZEN_KEYS


@pytest.mark.parametrize("style", ["init", "setup", "configure_model"])
def test_no_match_error_names_the_hook_where_the_model_was_inspected(tmp_path, style):
    callback = lora(LoRAConfig(r=2, target_modules=["nope"]))
    with pytest.raises(ValueError, match=r"inspected in configure_model \(stage 'fit'\)"):
        trainer(tmp_path, 1, callback).fit(Mod(style), data())
