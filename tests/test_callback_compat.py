"""``LoRACallback`` alongside the rest of Lightning: checkpointing and early stopping,
gradient accumulation, bf16 autocast, DDP, HF gradient checkpointing, ``torch.compile``,
the optimizer guard, summaries and logger output, and the export flags.

Every run is a few steps of a tiny MLP (or two MiniLM batches of 2 x 8 tokens) on the CPU.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from _helpers import assert_close_fp32
from _tiny import TinyNet
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lora_lightning.lightning.callback as callback_module
from lora_lightning import (
    LoRACallback,
    LoRAConfig,
    adapter_state_dict,
    load_adapter,
    load_lora_checkpoint,
)

TESTS = Path(__file__).resolve().parent
CONFIG = LoRAConfig(r=2, alpha=4, target_modules=["fc1", "fc2"])
ADAPTER_KEYS = {f"net.{m}.{p}" for m in ("fc1", "fc2") for p in ("lora_A", "lora_B")}


# -- a tiny model and helpers -------------------------------------------------------------
class TinyModule(L.LightningModule):
    """Seeded, so every instance starts from the same base weights; plain SGD."""

    def __init__(self, width: int = 16, lr: float = 0.5, log_metrics: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = TinyNet(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x).float(), y)
        if self.hparams.log_metrics:
            self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x).float(), y))

    def configure_optimizers(self):
        return torch.optim.SGD(
            [p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr
        )


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def data(n: int = 32, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())


def loader(batch_size: int = 8, n: int = 32, seed: int = 1) -> DataLoader:
    return DataLoader(data(n, seed), batch_size=batch_size, shuffle=False)


def make_trainer(root: Path, callbacks: list, **kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def adapters(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter_state_dict(module).items()}


def assert_base_unchanged(module: nn.Module, base: dict[str, torch.Tensor]) -> None:
    """Every tensor of the un-injected module is still bit-for-bit what it was."""
    now = module.state_dict()
    for key, before in base.items():
        assert torch.equal(now[key], before), f"frozen base tensor {key} changed"


def assert_all_changed(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> None:
    assert set(after) == set(before) == ADAPTER_KEYS
    for key in ADAPTER_KEYS:
        assert not torch.equal(after[key], before[key]), f"adapter {key} did not train"


class StartSnapshot(Callback):
    """The adapters as training starts: injected, not yet trained."""

    def __init__(self) -> None:
        self.adapters: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.adapters = adapters(pl_module)


# -- ModelCheckpoint and EarlyStopping ----------------------------------------------------
def test_model_checkpoint_top_k_and_last_are_adapter_only_and_reload(tmp_path):
    module = TinyModule()
    base = snapshot(module)
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt",
        monitor="val_loss",
        mode="min",
        save_top_k=2,
        save_last=True,
        filename="{epoch}-{val_loss:.4f}",
    )
    trainer = make_trainer(
        tmp_path, [LoRACallback(CONFIG, verbose=False), ckpt], max_epochs=4,
        enable_checkpointing=True,
    )
    trainer.fit(module, loader(8), loader(16, seed=2))
    final = adapters(module)

    assert len(ckpt.best_k_models) == 2
    expected = {Path(p).name for p in ckpt.best_k_models} | {"last.ckpt"}
    assert {p.name for p in (tmp_path / "ckpt").glob("*.ckpt")} == expected
    assert Path(ckpt.last_model_path).name == "last.ckpt"

    x_val, y_val = data(32, seed=2).tensors
    for name in sorted(expected):
        path = tmp_path / "ckpt" / name
        raw = torch.load(path, map_location="cpu", weights_only=False)
        assert set(raw["state_dict"]) == ADAPTER_KEYS, f"{name} is not adapter-only"
        assert raw["lora_lightning"]["mode"] == "adapter"
        loaded = load_lora_checkpoint(TinyModule, path)
        assert_base_unchanged(loaded, base)
        for key in ADAPTER_KEYS:
            assert torch.equal(loaded.state_dict()[key], raw["state_dict"][key])
        if name == "last.ckpt":
            for key in ADAPTER_KEYS:
                assert torch.equal(loaded.state_dict()[key], final[key])
        else:  # the reloaded adapters reproduce the score the checkpoint was ranked by
            with torch.no_grad():
                val_loss = F.cross_entropy(loaded(x_val), y_val)
            assert val_loss.item() == pytest.approx(
                float(ckpt.best_k_models[str(path)]), abs=1e-5
            )


def test_early_stopping_stops_training_and_lora_does_not_interfere(tmp_path):
    module = TinyModule()
    base = snapshot(module)
    # min_delta=10: the first epoch sets the best score, the second cannot beat it.
    stopper = EarlyStopping(monitor="val_loss", mode="min", patience=1, min_delta=10.0)
    start = StartSnapshot()
    trainer = make_trainer(
        tmp_path, [LoRACallback(CONFIG, verbose=False), stopper, start], max_epochs=10
    )
    trainer.fit(module, loader(8), loader(16, seed=2))

    assert trainer.should_stop
    assert stopper.stopped_epoch == 1
    assert trainer.current_epoch == 2
    assert trainer.global_step == 2 * 4
    assert_all_changed(adapters(module), start.adapters)
    assert_base_unchanged(module, base)


# -- gradient accumulation ----------------------------------------------------------------
def test_gradient_accumulation_matches_the_large_batch_and_keeps_base_frozen(tmp_path):
    accumulated = TinyModule()
    base = snapshot(accumulated)
    start = StartSnapshot()
    trainer = make_trainer(
        tmp_path, [LoRACallback(CONFIG, verbose=False), start], accumulate_grad_batches=2
    )
    trainer.fit(accumulated, loader(8))
    assert trainer.global_step == 2  # 4 batches, one optimizer step per 2

    large_batch = TinyModule()
    make_trainer(tmp_path, [LoRACallback(CONFIG, verbose=False)]).fit(large_batch, loader(16))

    got, want = adapters(accumulated), adapters(large_batch)
    assert_all_changed(got, start.adapters)
    for key in ADAPTER_KEYS:
        assert_close_fp32(got[key], want[key], msg=key)  # sums of 2 batches vs 1 batch
    assert_base_unchanged(accumulated, base)


# -- bf16 autocast on the CPU -------------------------------------------------------------
def test_bf16_mixed_on_cpu_trains_with_float32_adapters(tmp_path):
    module = TinyModule()
    base = snapshot(module)
    out_dtypes: list[torch.dtype] = []
    module.net.head.register_forward_hook(lambda m, i, out: out_dtypes.append(out.dtype))
    recorder, start = LossRecorder(), StartSnapshot()
    trainer = make_trainer(
        tmp_path, [LoRACallback(CONFIG, verbose=False), recorder, start],
        precision="bf16-mixed",
        max_steps=3,
    )
    trainer.fit(module, loader(8))

    assert out_dtypes and set(out_dtypes) == {torch.bfloat16}  # autocast really ran
    assert len(recorder.losses) == 3 and all(math.isfinite(v) for v in recorder.losses)
    after = adapters(module)
    assert {v.dtype for v in after.values()} == {torch.float32}
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert_all_changed(after, start.adapters)
    assert_base_unchanged(module, base)


# -- DDP over gloo, in a subprocess -------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_worker():
    spec = importlib.util.spec_from_file_location("_ddp_worker", TESTS / "_ddp_worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    return worker


def _ddp_env() -> dict[str, str]:
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(TESTS.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(var, None)
    return env


def _run_ddp(tmp_path, out, *mode: str) -> list[dict]:
    """Run tests/_ddp_worker.py on two gloo processes; each rank's dump."""
    proc = subprocess.run(
        [sys.executable, str(TESTS / "_ddp_worker.py"), str(out), "2", *mode],
        env=_ddp_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_ddp_two_cpu_processes_match_a_single_process_run(tmp_path):
    out = tmp_path / "ddp"
    ranks = _run_ddp(tmp_path, out)
    assert [r["world_size"] for r in ranks] == [2, 2]

    worker = _load_worker()
    single, trainer, single_start = worker.train(devices=1)
    assert trainer.global_step == ranks[0]["global_step"] == worker.STEPS
    want = adapters(single)
    base = snapshot(worker.WorkerModule())
    for rank in ranks:
        assert set(rank["adapters"]) == set(want) == ADAPTER_KEYS
        for key in ADAPTER_KEYS:
            assert torch.equal(rank["start"][key], single_start[key])  # same starting point
            assert not torch.equal(rank["adapters"][key], rank["start"][key]), key
            torch.testing.assert_close(rank["adapters"][key], want[key], atol=1e-5, rtol=1e-5)
        for key, value in base.items():
            assert torch.equal(rank["base"][key], value), f"DDP changed frozen {key}"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_ddp_gradient_init_averages_the_ranks_and_matches_a_single_process(tmp_path):
    """init="gradient" under DDP: each rank sees half the batch, the weight gradients are
    averaged before A is set, so both ranks start (and end) where one process does."""
    out = tmp_path / "ddp_grad"
    ranks = _run_ddp(tmp_path, out, "gradient")
    worker = _load_worker()
    single, _, _ = worker.train(devices=1, config=worker.GRADIENT)
    plain, _, _ = worker.train(devices=1)
    want = adapters(single)
    for key in ADAPTER_KEYS:
        for rank in ranks:
            torch.testing.assert_close(rank["adapters"][key], want[key], atol=1e-5, rtol=1e-5)
        if key.endswith("lora_A"):  # the init really ran: another A than kaiming's
            assert not torch.allclose(want[key], adapters(plain)[key], atol=1e-3)


# -- HF MiniLM with gradient checkpointing ------------------------------------------------
class _TokenBatches(torch.utils.data.Dataset):
    def __init__(self, n: int = 4, length: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1000, 5000, (n, length), generator=g)
        self.labels = torch.arange(n) % 2

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


def _minilm_run(tmp_path: Path, steps: int = 2) -> tuple[dict, dict, dict, int]:
    """``steps`` steps of MiniLM with reentrant checkpointing and HF's own input-grad hook
    removed (as with models or transformers versions that do not add it). Returns the
    adapters before and after, every adapter's largest |grad| over the steps, and how
    many checkpointed layer calls ran."""
    from lora_lightning.examples import ClassifierModule, MiniLMClassifier

    torch.manual_seed(0)
    net = MiniLMClassifier(dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated alias in transformers 5
        net.encoder.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": True}
        )
    if hasattr(net.encoder, "disable_input_require_grads"):
        net.encoder.disable_input_require_grads()
    calls = [0]
    for layer in net.encoder.modules():
        func = layer.__dict__.get("_gradient_checkpointing_func")
        if func is not None and getattr(layer, "gradient_checkpointing", False):
            def counted(*args, _func=func, **kwargs):
                calls[0] += 1
                return _func(*args, **kwargs)

            layer._gradient_checkpointing_func = counted
    # HF checkpoints only in train mode, and Lightning keeps each submodule's mode as
    # found; make sure (from_pretrained alone returns eval mode).
    net.train()
    module = ClassifierModule(net, lr=1e-2)
    config = LoRAConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    grads: dict[str, float] = {}

    class GradRecorder(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            for n, p in pl_module.named_parameters():
                if "lora_" in n:
                    g = 0.0 if p.grad is None else p.grad.abs().max().item()
                    grads[n] = max(grads.get(n, 0.0), g)

    start = StartSnapshot()
    trainer = make_trainer(
        tmp_path, [LoRACallback(config, verbose=False), start, GradRecorder()],
        max_steps=steps,
    )
    trainer.fit(module, DataLoader(_TokenBatches(2 * steps), batch_size=2))
    after = {k: v.detach().clone() for k, v in module.state_dict().items() if "lora_" in k}
    before = {k: v for k, v in start.adapters.items() if "lora_" in k}
    return before, after, grads, calls[0]


def _expected_minilm_adapters() -> set[str]:
    return {
        f"net.encoder.encoder.layer.{i}.attention.self.{m}.{p}"
        for i in range(6) for m in ("query", "value") for p in ("lora_A", "lora_B")
    }


def test_minilm_gradient_checkpointing_trains_every_adapter(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before, after, grads, checkpointed = _minilm_run(tmp_path)
    # The callback reads transformers 5's flag, not the deprecated alias removed in v6.
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    assert checkpointed == 2 * 6  # every layer of both steps ran under checkpointing
    assert set(before) == set(after) == set(grads) == _expected_minilm_adapters()
    for key in after:
        assert grads[key] > 0, f"{key} got no gradient under gradient checkpointing"
        assert not torch.equal(after[key], before[key]), f"{key} did not change"


def test_minilm_gradient_checkpointing_trap_without_the_fix(tmp_path, monkeypatch):
    """The control: without the callback's input-grad fix, reentrant checkpointing over a
    frozen embedding silently leaves every adapter untrained (the head still trains, so
    nothing fails). This is what the test above would catch."""
    monkeypatch.setattr(callback_module, "_enable_input_grads_for_checkpointing", lambda m: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "None of the inputs have requires_grad"
        before, after, grads, checkpointed = _minilm_run(tmp_path)
    assert checkpointed == 2 * 6
    assert set(after) == _expected_minilm_adapters()
    assert all(g == 0.0 for g in grads.values())
    assert all(torch.equal(after[k], before[k]) for k in after)


# -- torch.compile ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]
)
def test_compiled_module_trains_adapters(tmp_path, backend):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    module = TinyModule(log_metrics=False)
    base = snapshot(module)
    compiled = torch.compile(module, backend=backend)
    recorder, start = LossRecorder(), StartSnapshot()
    trainer = make_trainer(
        tmp_path, [LoRACallback(CONFIG, verbose=False), recorder, start], max_steps=3
    )
    trainer.fit(compiled, loader(8))

    assert module._compiler_ctx is not None  # Lightning ran the compiled forward/step
    assert counters["stats"]["unique_graphs"] >= 1
    assert len(recorder.losses) == 3 and all(math.isfinite(v) for v in recorder.losses)
    assert_all_changed(adapters(module), start.adapters)
    assert_base_unchanged(module, base)


# -- optimizer guard ----------------------------------------------------------------------
class EarlyOptimizerModule(TinyModule):
    """The classic mistake: a parameter list captured in ``__init__``, before injection."""

    def __init__(self) -> None:
        super().__init__()
        self.early_params = list(self.parameters())

    def configure_optimizers(self):
        return torch.optim.SGD(self.early_params, lr=0.1)


class ImpostorModule(TinyModule):
    """Every trainable tensor is in the optimizer except ``fc1.lora_B``, replaced by a
    different tensor with the same shape and the same (zero) value."""

    def configure_optimizers(self):
        params = []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name == "net.fc1.lora_B":
                assert torch.equal(p, torch.zeros_like(p))
                p = nn.Parameter(torch.zeros_like(p))
            params.append(p)
        return torch.optim.SGD(params, lr=0.1)


def test_optimizer_built_before_injection_fails_at_train_start(tmp_path):
    module = EarlyOptimizerModule()
    trainer = make_trainer(tmp_path, [LoRACallback(CONFIG, verbose=False)], max_steps=2)
    with pytest.raises(RuntimeError, match="in no optimizer") as err:
        trainer.fit(module, loader(8))
    message = str(err.value)
    for key in ADAPTER_KEYS:
        assert key in message
    assert "4 trainable parameter(s)" in message
    assert "configure_optimizers" in message
    assert trainer.global_step == 0


def test_optimizer_guard_compares_identity_not_value(tmp_path):
    module = ImpostorModule()
    trainer = make_trainer(tmp_path, [LoRACallback(CONFIG, verbose=False)], max_steps=2)
    with pytest.raises(RuntimeError, match=r"1 trainable parameter\(s\)") as err:
        trainer.fit(module, loader(8))
    assert "'net.fc1.lora_B'" in str(err.value)
    assert "net.fc2.lora_B" not in str(err.value)
    assert trainer.global_step == 0


def test_optimizer_guard_can_be_turned_off(tmp_path):
    module = ImpostorModule()
    trainer = make_trainer(
        tmp_path, [LoRACallback(CONFIG, verbose=False, check_optimizer=False)], max_steps=2
    )
    trainer.fit(module, loader(8))
    assert trainer.global_step == 2
    assert torch.equal(module.net.fc1.lora_B, torch.zeros_like(module.net.fc1.lora_B))


class TwoOptimizers(TinyModule):
    """Manual optimization: fc1's tensors in one optimizer, the rest in a second."""

    def __init__(self, leave_fc2_out: bool) -> None:
        super().__init__()
        self.leave_fc2_out = leave_fc2_out
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()

    def configure_optimizers(self):
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        first = [p for n, p in trainable if ".fc1." in n]
        second = [p for n, p in trainable if ".fc1." not in n
                  and not (self.leave_fc2_out and ".fc2." in n)]
        return torch.optim.SGD(first, lr=0.1), torch.optim.SGD(second, lr=0.1)


TWO_OPTIMIZERS_CONFIG = {"r": 2, "target_modules": ["fc1", "fc2"], "modules_to_save": ["head"]}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_guard_accepts_adapters_spread_over_two_optimizers(tmp_path):
    module = TwoOptimizers(leave_fc2_out=False)
    make_trainer(tmp_path, [LoRACallback(TWO_OPTIMIZERS_CONFIG, verbose=False)],
                 max_steps=2).fit(module, loader(4, n=8))
    assert len(module.trainer.optimizers) == 2
    assert module.net.fc2.lora_B.abs().max() > 0  # trained through the second optimizer


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_guard_refuses_an_adapter_missing_from_the_second_optimizer(tmp_path):
    module = TwoOptimizers(leave_fc2_out=True)
    with pytest.raises(RuntimeError) as err:
        make_trainer(tmp_path, [LoRACallback(TWO_OPTIMIZERS_CONFIG, verbose=False)],
                     max_steps=2).fit(module, loader(4, n=8))
    assert "net.fc2.lora_A" in str(err.value) and "net.fc1" not in str(err.value)


# -- reporting ----------------------------------------------------------------------------
WIDE = LoRAConfig(r=16, alpha=32, target_modules=["fc1", "fc2"])


def _expected_counts(module: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for n, p in module.named_parameters() if "lora_" in n)
    return trainable, sum(p.numel() for p in module.parameters())


def _summary_rows(text: str) -> dict[str, str]:
    lines = text[text.index("LoRA summary"):].splitlines()[2:12]
    rows = {}
    for line in lines:
        key, _, value = line.partition("  ")
        rows[key.strip()] = value.strip()
    return rows


def test_summary_table_is_printed_once_at_fit_start(tmp_path, caplog, capfd):
    caplog.set_level(logging.INFO)
    module = TinyModule(width=256)

    def summaries() -> list[str]:
        return [r.getMessage() for r in caplog.records if "LoRA summary" in r.getMessage()]

    seen_at: dict[str, int] = {}

    class Marker(Callback):  # runs after LoRACallback's hooks of the same name
        def on_fit_start(self, trainer, pl_module) -> None:
            seen_at["fit_start"] = len(summaries())

    trainer = make_trainer(tmp_path, [LoRACallback(WIDE), Marker()], max_steps=2)
    trainer.fit(module, loader(8))
    captured = capfd.readouterr()

    if summaries():  # Lightning's logger propagates to pytest's handler
        assert len(summaries()) == 1
        assert seen_at["fit_start"] == 1
        text = summaries()[0]
    else:  # Lightning's logger has its own stream handler
        text = captured.out + captured.err
        assert text.count("LoRA summary") == 1
    rows = _summary_rows(text)
    trainable, total = _expected_counts(module)
    assert trainable == (16 * 8 + 256 * 16) + (16 * 256 + 256 * 16)  # fc1 A, B + fc2 A, B
    assert rows["r"] == "16"
    assert rows["alpha"] == "32"
    assert rows["scaling"] == "2 (alpha/r)"
    assert rows["modules"] == "2"
    assert rows["trainable"] == f"{trainable:,}"
    assert rows["total"] == f"{total:,}"
    assert rows["ratio"] == f"{100 * trainable / total:.3f}%"
    assert rows["adapter size"] == f"{trainable * 4 / 1e6:.2f} MB"
    assert rows["targets"] == "2 Linear"


def test_summary_is_not_printed_when_verbose_is_false(tmp_path, caplog, capfd):
    caplog.set_level(logging.INFO)
    trainer = make_trainer(tmp_path, [LoRACallback(CONFIG, verbose=False)], max_steps=1)
    trainer.fit(TinyModule(), loader(8))
    captured = capfd.readouterr()
    assert "LoRA summary" not in caplog.text + captured.out + captured.err


def _tb_scalars(log_dir: str) -> tuple[dict[str, float], dict[str, object]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(log_dir)
    acc.Reload()
    scalars = {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    hparams = {}
    for key, value in info.hparams.items():
        kind = value.WhichOneof("kind")
        hparams[key] = getattr(value, kind)
    return scalars, hparams


class TinyData(L.LightningDataModule):
    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        return loader(self.hparams.batch_size)


def test_scalars_and_hparams_reach_csv_and_tensorboard(tmp_path):
    module = TinyModule(width=256)
    csv_logger = CSVLogger(tmp_path, name="csv")
    tb_logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = make_trainer(
        tmp_path, [LoRACallback(WIDE, verbose=False)], max_steps=2,
        logger=[csv_logger, tb_logger], log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=TinyData(batch_size=8))
    trainable, total = _expected_counts(module)
    want = {
        "lora/trainable_params": float(trainable),
        "lora/total_params": float(total),
        "lora/trainable_ratio": trainable / total,
    }
    want_hparams = {"lora/r": 16, "lora/alpha": 32.0, "lora/targets": "fc1,fc2",
                    "lora/scaling": "alpha/r"}

    with open(csv_logger.experiment.metrics_file_path, newline="") as f:
        rows = list(csv.DictReader(f))
    for key, value in want.items():
        logged = [float(r[key]) for r in rows if r.get(key)]
        assert logged, f"{key} missing from the CSV metrics"
        assert logged[0] == pytest.approx(value, rel=1e-6)
    assert any(r.get("train_loss") for r in rows)  # the module's own metrics still log
    csv_hparams = yaml.safe_load(Path(csv_logger.log_dir, "hparams.yaml").read_text())
    for key, value in want_hparams.items():
        assert csv_hparams[key] == value
    assert csv_hparams["width"] == 256  # the module's own hparams are kept

    scalars, tb_hparams = _tb_scalars(tb_logger.log_dir)
    for key, value in want.items():
        assert scalars[key] == pytest.approx(value, rel=1e-6)
    for key, value in want_hparams.items():
        assert tb_hparams[key] == value, key
    # One record holds ours and everything Lightning logs: the module's, the datamodule's.
    assert tb_hparams["width"] == 256 and tb_hparams["batch_size"] == 8
    tb_yaml = yaml.safe_load(Path(tb_logger.log_dir, "hparams.yaml").read_text())
    for key, value in want_hparams.items():
        assert tb_yaml[key] == value


# -- export flags -------------------------------------------------------------------------
class _NamedClasses(L.LightningDataModule):
    """A datamodule that names its classes, as the app's text data does."""

    label_names = ("down", "up")

    def train_dataloader(self) -> DataLoader:
        return loader(8)


@pytest.mark.parametrize("saved", [["head"], None])
def test_an_exported_classifier_adapter_carries_the_datamodules_label_names(tmp_path, saved):
    # A served adapter answers with its own class names; they travel only with an adapter
    # that trains the head they name.
    from lora_lightning.io.adapter_files import read_label_names

    config = LoRAConfig(r=2, alpha=4, target_modules=["fc1", "fc2"], modules_to_save=saved)
    adapter_dir = tmp_path / "adapter"
    trainer = make_trainer(tmp_path, [LoRACallback(config, verbose=False,
                                                   export_adapter_dir=str(adapter_dir))],
                           max_steps=1)
    trainer.fit(TinyModule(), datamodule=_NamedClasses())
    assert read_label_names(adapter_dir) == (["down", "up"] if saved else None)


def test_export_flags_write_a_peft_adapter_and_a_merged_state_dict(tmp_path):
    module = TinyModule()
    adapter_dir, merged_path = tmp_path / "adapter", tmp_path / "out" / "merged.pt"
    trainer = make_trainer(
        tmp_path,
        [LoRACallback(CONFIG, verbose=False, export_adapter_dir=str(adapter_dir),
                      export_merged_path=str(merged_path))],
        max_steps=3,
    )
    trainer.fit(module, loader(8))
    module.eval()
    x = data(16, seed=3).tensors[0]
    with torch.no_grad():
        want = module(x)
        base_out = TinyModule().eval()(x)
    assert not torch.allclose(want, base_out, atol=1e-4)  # the adapters matter

    assert {p.name for p in adapter_dir.iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "lora_lightning.json"
    }
    peft_loaded = load_adapter(TinyModule(), adapter_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_loaded(x), want, atol=1e-6, rtol=1e-5)

    merged = torch.load(merged_path, map_location="cpu", weights_only=True)
    plain = TinyModule()
    plain.load_state_dict(merged, strict=True)
    assert not any("lora_" in k for k in merged)
    with torch.no_grad():
        assert_close_fp32(plain.eval()(x), want)  # merged weights vs the adapter path


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_a_checkpoint_saved_by_two_ddp_processes_restores_every_rank_s_adapters(tmp_path):
    """Issue 19, item 2 (an Accelerate FSDP2 bug saved only rank 0's shard and silently
    reset the rest on resume): every rank restores the saved adapters, not its fresh ones."""
    ckpt = tmp_path / "ddp.ckpt"
    trained = _run_ddp(tmp_path, tmp_path / "first", f"save:{ckpt}")
    saved = torch.load(ckpt, weights_only=False)
    assert saved["lora_lightning"]["mode"] == "adapter"
    resumed = _run_ddp(tmp_path, tmp_path / "resumed", f"resume:{ckpt}")
    for rank in (0, 1):
        restored = resumed[rank]["start"]  # the adapters at train start, after the restore
        assert set(restored) == ADAPTER_KEYS
        for key in ADAPTER_KEYS:
            assert torch.equal(restored[key], saved["state_dict"][key]), (rank, key)
            assert torch.equal(restored[key], trained[rank]["adapters"][key]), (rank, key)
            assert not torch.equal(restored[key], trained[rank]["start"][key]), (rank, key)
        assert resumed[rank]["global_step"] == 2 * trained[rank]["global_step"]
