"""Training runs and fault injection for ``tests/test_reliability*.py``.

A run that is to be killed must be its own process. Importing torch and Lightning costs
5-15 s on a loaded machine, so runs are forked from one ``multiprocessing`` forkserver that
imported them once (``run_child``); each child is a fresh process that shares nothing with
pytest and is killed with a real ``SIGKILL``. A child is described by a plain dict (``spec``)
and writes what it saw to ``<root>/<name>.result.pt``.

The model is tiny, fp32 on the CPU, with dropout 0, and the data order is a permutation
seeded by the epoch number (``EpochSampler.set_epoch``, which Lightning calls), so a run
resumed from an epoch-end checkpoint sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import resource
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from _tiny import TinyNet as Net  # noqa: F401 - re-exported to the tests
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lora_lightning import LoRACallback, LoRAConfig, adapter_state_dict  # noqa: F401 - re-exported

CONFIG = LoRAConfig(r=2, alpha=4, target_modules=["fc1", "fc2"], modules_to_save=["head"])
BATCH = 8
STEPS_PER_EPOCH = 4
KILL_MARKER = "killpoint.json"


# -- model and data --------------------------------------------------------------------
class Module(L.LightningModule):
    """AdamW plus a per-step LR schedule, so optimizer and scheduler state must resume too."""

    def __init__(self, width: int = 16, lr: float = 0.05, step_lr: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = Net(width)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad],
                                lr=self.hparams.lr)
        if not self.hparams.step_lr:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class EpochSampler(Sampler):
    """A permutation seeded by the epoch: shuffled, yet the same after a resume."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(1000 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def loader(steps: int = STEPS_PER_EPOCH, random_labels: bool = False) -> DataLoader:
    """``steps`` batches of 8; labels a simple function of x, or random (never learnt
    perfectly, so the loss never settles into ties)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * steps, 8, generator=g)
    y = torch.randint(0, 2, (len(x),), generator=g) if random_labels else (x[:, 0] + x[:, 1] > 0)
    y = y.long()
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, sampler=EpochSampler(len(x)))


def make_trainer(root: Path, *callbacks: Callback, **kwargs: Any) -> L.Trainer:
    kwargs.setdefault("max_epochs", 1)
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, callbacks=list(callbacks), **kwargs,
    )


def lora(**kwargs: Any) -> LoRACallback:
    return LoRACallback(CONFIG, verbose=False, **kwargs)


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def rss_bytes() -> int:
    """Current resident set size, from ``/proc/self/statm``."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- callbacks used by the children ------------------------------------------------------
class Counter(Callback):
    """Counts the optimizer steps this process really takes."""

    def __init__(self) -> None:
        self.steps = 0
        self.start_step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_step = trainer.global_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps += 1


class Stall(Callback):
    """At the chosen point, tell the parent where we are and wait to be killed.

    ``phase`` is ``"before_step"`` (inside the step, after forward and backward, before the
    optimizer step), ``"after_step"`` (after the optimizer step) or ``"saving"`` (while
    Lightning builds a checkpoint at the end of the epoch, before any byte is written).
    """

    def __init__(self, root: Path, step: int, phase: str) -> None:
        self.root, self.step, self.phase = root, step, phase

    def _stall(self, trainer) -> None:
        marker = self.root / KILL_MARKER
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"global_step": trainer.global_step, "phase": self.phase}))
        os.replace(tmp, marker)
        time.sleep(120)  # the parent SIGKILLs us here
        os._exit(3)  # never reached unless the parent is gone

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.phase == "before_step" and trainer.global_step == self.step:
            self._stall(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.phase == "after_step" and trainer.global_step == self.step:
            self._stall(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.phase == "saving" and trainer.global_step == self.step:
            self._stall(trainer)


# -- fault injection inside a child ------------------------------------------------------
def _die_after_half(dst: str, data: bytes) -> None:
    with open(dst, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def _inject(fault: str, nth: int) -> None:
    """Make the ``nth`` write of a checkpoint or adapter file die halfway with SIGKILL."""
    seen = {"n": 0}

    def hit(name: str, wanted: str) -> bool:
        if wanted not in os.path.basename(name):
            return False
        seen["n"] += 1
        return seen["n"] == nth

    if fault == "kill_in_ckpt_write":
        from fsspec.implementations.local import LocalFileOpener

        real_write = LocalFileOpener.write

        def write(self, data, *args, **kwargs):  # self.path is the final name
            if hit(self.path, "last.ckpt"):
                self.f.write(bytes(data)[: len(data) // 2])
                self.f.flush()
                os.fsync(self.f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return real_write(self, data, *args, **kwargs)

        LocalFileOpener.write = write
    elif fault == "kill_in_cross_device_copy":
        # The temporary file Lightning writes (via fsspec) lies in the system temp dir; where
        # that is another filesystem than the checkpoint dir (a local /tmp and a network
        # checkpoint dir, as on most clusters), rename fails with EXDEV and fsspec copies.
        real_rename, real_copyfile = os.rename, shutil.copyfile

        def rename(src, dst, *args, **kwargs):
            if os.path.dirname(os.path.abspath(src)) != os.path.dirname(os.path.abspath(dst)):
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), src, None, dst)
            return real_rename(src, dst, *args, **kwargs)

        def copyfile(src, dst, *args, **kwargs):
            if hit(str(dst), "last.ckpt"):
                _die_after_half(str(dst), Path(src).read_bytes())
            return real_copyfile(src, dst, *args, **kwargs)

        os.rename, shutil.copyfile = rename, copyfile
    elif fault in ("kill_in_adapter_weights", "kill_in_adapter_config"):
        import safetensors.torch

        if fault == "kill_in_adapter_weights":
            real_save = safetensors.torch.save_file

            def save_file(tensors, filename, *args, **kwargs):
                if hit("adapter_model.safetensors", "adapter"):
                    _die_after_half(str(filename), safetensors.torch.save(tensors))
                return real_save(tensors, filename, *args, **kwargs)

            safetensors.torch.save_file = save_file
        else:
            real_write_text = Path.write_text

            def write_text(self, data, *args, **kwargs):
                if hit(self.name, "adapter_config.json"):
                    _die_after_half(str(self), data.encode())
                return real_write_text(self, data, *args, **kwargs)

            Path.write_text = write_text
    elif fault:
        raise ValueError(f"unknown fault {fault!r}")


# -- child entry point -------------------------------------------------------------------
def child(spec: dict[str, Any]) -> None:
    """Run one spec; see ``run_child``. Never returns normally into multiprocessing's
    cleanup: it exits with ``os._exit`` so a child never runs pytest's atexit hooks."""
    root = Path(spec["root"])
    log = open(root / f"{spec['name']}.log", "w")  # noqa: SIM115 - lives as long as the process
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    code = 0
    print(f"child entered {time.time() - spec.get('t0', time.time()):.2f} s after start", flush=True)
    try:
        torch.set_num_threads(1)
        result = _KINDS[spec["kind"]](root, spec)
        torch.save(result, root / f"{spec['name']}.result.pt")
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    log.flush()
    os._exit(code)


def _train(root: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Train ``epochs`` epochs with ModelCheckpoint(save_last=True) each epoch, optionally
    resuming from ``last``, optionally stalling to be killed or dying inside a write."""
    _inject(spec.get("fault"), spec.get("nth", 1))
    module, counter = Module(), Counter()
    callbacks: list[Callback] = [lora(), counter]
    if spec.get("stall"):
        callbacks.append(Stall(root, **spec["stall"]))
    ckpt = ModelCheckpoint(dirpath=root / "ckpts", save_last=True, every_n_epochs=1)
    trainer = make_trainer(root, *callbacks, ckpt, max_epochs=spec["epochs"])
    trainer.fit(module, loader(), ckpt_path="last" if spec.get("resume") else None)
    opt = trainer.optimizers[0]
    return {
        "global_step": trainer.global_step,
        "start_step": counter.start_step,
        "steps_here": counter.steps,
        "adam_steps": sorted({int(s["step"]) for s in opt.state.values()}),
        "lr": opt.param_groups[0]["lr"],
        "adapters": adapter_state_dict(module),
        "resumed_from": str(trainer.ckpt_path) if trainer.ckpt_path else None,
    }


def _adapter_save(root: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Save adapter ``old`` to ``root/adapter``, then die inside the save of ``new``."""
    from lora_lightning import inject_lora, save_adapter

    model = Net()
    inject_lora(model, CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    save_adapter(model, root / "adapter", CONFIG)
    torch.save(adapter_state_dict(model), root / "old_adapter.pt")
    _inject(spec["fault"], 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    save_adapter(model, root / "adapter", CONFIG)
    return {"survived": True}  # the fault should have killed us


class _FileSizeLimit(Callback):
    """At the end of epoch ``epoch`` (before ModelCheckpoint, which Lightning runs last),
    make every file write past half the size of ``reference`` fail with EFBIG."""

    def __init__(self, epoch: int, reference: Path) -> None:
        self.epoch, self.reference = epoch, reference
        self.state_at_save: dict[str, torch.Tensor] | None = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            self.state_at_save = clone_state(pl_module)
            set_file_size_limit(self.reference.stat().st_size // 2)


def set_file_size_limit(limit: int | None) -> None:
    """``RLIMIT_FSIZE``: the kernel fails writes past ``limit`` with EFBIG (SIGXFSZ ignored)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY if limit is None
                                               else limit, hard))


def _file_too_large(root: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Real write failures (EFBIG from the kernel) while saving a checkpoint in fit, and
    while saving an adapter directory. Output goes to /dev/null: the limit covers it too."""
    from lora_lightning import inject_lora, save_adapter

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    out: dict[str, Any] = {}
    module = Module()
    limiter = _FileSizeLimit(epoch=1, reference=root / "ckpts" / "last.ckpt")
    ckpt = ModelCheckpoint(dirpath=root / "ckpts", save_last=True, every_n_epochs=1)
    trainer = make_trainer(root, lora(), limiter, ckpt, max_epochs=2)
    try:
        trainer.fit(module, loader())
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        out["fit_error"] = f"{type(err).__name__}: {err}"
    finally:
        set_file_size_limit(None)
    out["state_after"] = clone_state(module)
    out["state_at_save"] = limiter.state_at_save

    model = Net()
    inject_lora(model, CONFIG)
    save_adapter(model, root / "adapter", CONFIG)
    out["adapter_before"] = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    with torch.no_grad():
        model.fc1.lora_B.add_(1.0)
    set_file_size_limit((root / "adapter" / "adapter_model.safetensors").stat().st_size // 2)
    try:
        save_adapter(model, root / "adapter", CONFIG)
    except BaseException as err:  # noqa: BLE001
        out["adapter_error"] = f"{type(err).__name__}: {err}"
    finally:
        set_file_size_limit(None)
    return out


# -- soak: many steps, many checkpoints -----------------------------------------------------
SOAK_CONFIG = LoRAConfig(r=64, alpha=64, target_modules=["fc1", "fc2"], modules_to_save=["head"])
SOAK_WIDTH = 512  # ~100k trained tensors: each checkpoint holds ~1.2 MB with AdamW moments
SOAK_EVERY = 50


def soak_module() -> Module:
    return Module(width=SOAK_WIDTH, lr=1e-4, step_lr=False)


def soak_loader() -> DataLoader:
    return loader(steps=64, random_labels=True)


class _Recorder(Callback):
    """The monitored loss at every checkpoint step, and memory at chosen steps."""

    def __init__(self, memory_steps: set[int]) -> None:
        self.memory_steps = memory_steps
        self.losses: dict[int, float] = {}
        self.rss: dict[int, int] = {}
        self.peak: dict[int, int] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % SOAK_EVERY == 0:
            self.losses[step] = float(trainer.callback_metrics["train_loss"])
        if step in self.memory_steps:
            self.rss[step] = rss_bytes()
            self.peak[step] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _soak(root: Path, spec: dict[str, Any]) -> dict[str, Any]:
    steps = spec["steps"]
    recorder = _Recorder(set(range(100, steps + 1, 100)))
    ckpt = ModelCheckpoint(dirpath=root / "ckpts", filename="{step}", monitor="train_loss",
                           mode="min", save_top_k=3, save_last=True,
                           every_n_train_steps=SOAK_EVERY)
    trainer = make_trainer(root, LoRACallback(SOAK_CONFIG, verbose=False), recorder, ckpt,
                           max_steps=steps, max_epochs=-1)
    started = time.perf_counter()
    trainer.fit(soak_module(), soak_loader())
    return {"seconds": time.perf_counter() - started, "losses": recorder.losses,
            "rss": recorder.rss, "peak": recorder.peak, "global_step": trainer.global_step}


_KINDS = {"train": _train, "adapter_save": _adapter_save, "file_too_large": _file_too_large,
          "soak": _soak}


# -- parent side ---------------------------------------------------------------------------
# What the forkserver imports once. Not this module: Python 3.11's forkserver ignores the
# parent's sys.path, so it cannot find tests/ (each child then imports this module itself,
# which is cheap once these are loaded).
_PRELOAD = ["torch", "lightning.pytorch", "lora_lightning", "lora_lightning.lightning.callback",
            "safetensors.torch"]


def _context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_child(spec: dict[str, Any], timeout: float = 120.0) -> tuple[int | None, dict | None]:
    """Run ``spec`` in a forked child; SIGKILL it once it reports its kill point.

    Returns ``(exitcode, result)``; ``exitcode`` is ``-9`` for a killed child and
    ``result`` is ``None`` when the child wrote none.
    """
    root = Path(spec["root"])
    root.mkdir(parents=True, exist_ok=True)
    marker = root / KILL_MARKER
    marker.unlink(missing_ok=True)
    spec = {**spec, "t0": time.time()}
    proc = _context().Process(target=child, args=(spec,), daemon=True)
    proc.start()
    deadline = time.monotonic() + timeout
    while proc.is_alive() and time.monotonic() < deadline:
        if marker.exists():
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.join(max(0.0, deadline - time.monotonic()))
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise TimeoutError(f"child {spec['name']} ran past {timeout} s; log: {log_of(spec)}")
    result = root / f"{spec['name']}.result.pt"
    return proc.exitcode, (torch.load(result, weights_only=False) if result.exists() else None)


def log_of(spec: dict[str, Any]) -> str:
    path = Path(spec["root"]) / f"{spec['name']}.log"
    return path.read_text()[-3000:] if path.exists() else "(no log)"
