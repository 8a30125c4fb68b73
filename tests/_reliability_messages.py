"""Print, as Markdown table rows, the message a user gets for each bad input and damaged
file that ``tests/test_reliability_*.py`` tries; ``tests/README.md`` quotes this output.

    python tests/_reliability_messages.py

Temporary paths are shown as ``<dir>``.
"""

from __future__ import annotations

import errno
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _reliability_worker import CONFIG, Module, Net, loader, lora, make_trainer  # noqa: E402

from lora_lightning import (  # noqa: E402
    LoRACallback,
    LoRAConfig,
    inject_lora,
    load_lora_checkpoint,
    read_adapter,
    save_adapter,
)

ROOT = Path(tempfile.mkdtemp())


def message(fn) -> str:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - we want whatever the user would see
        text = f"{type(err).__name__}: {err}".replace(str(ROOT), "<dir>")
        return text.replace("|", "\\|").replace("\n", " ")
    return "(no error)"


def row(what: str, fn) -> None:
    print(f"| {what} | `{message(fn)}` |")


def config_rows() -> None:
    print("| bad input | message |\n|---|---|")
    for mapping in [{"r": 0}, {"r": 2.5}, {"alpha": float("nan")}, {"dropout": 1.0},
                    {"target_modules": "("}, {"target_modules": []},
                    {"target_modules": ["q", 3]}, {"rank_pattern": {"(?i)q": 4}},
                    {"alpha_pattern": "a"}, {"use_dora": "yes"}, {"bias": "some"},
                    {"init": "xavier"}, {"rank": 8}, {"target_modules": ["fc1"], "lora_alpha": 8}]:
        row(f"`LoRACallback({mapping!r})`", lambda m=mapping: LoRACallback(m))
    row("`LoRACallback(8)`", lambda: LoRACallback(8))
    row("`LoRACallback({'r': 2}, save='adapters')`", lambda: LoRACallback({"r": 2}, save="adapters"))
    row("target that matches nothing, in `fit`",
        lambda: make_trainer(ROOT, LoRACallback({"target_modules": ["query"]}, verbose=False),
                             enable_checkpointing=False).fit(Module(), loader()))
    row("target of an unsupported type (`nn.ModuleDict`)",
        lambda: inject_lora(nn.Sequential(nn.ModuleDict({"q": nn.Linear(2, 2)})),
                            LoRAConfig(target_modules=["0"])))
    row("`modules_to_save=['classifier']` on a model without one",
        lambda: inject_lora(Net(), LoRAConfig(target_modules=["fc1"],
                                              modules_to_save=["classifier"])))


def checkpoint_rows() -> None:
    print("\n| damaged or foreign checkpoint | message |\n|---|---|")
    trainer = make_trainer(ROOT, lora(), enable_checkpointing=False)
    trainer.fit(Module(), loader())
    good = ROOT / "good.ckpt"
    trainer.save_checkpoint(good)
    raw = good.read_bytes()
    damages = {"empty file": b"", "truncated to half": raw[: len(raw) // 2],
               "last 30 bytes cut": raw[:-30], "garbage": bytes(range(256)) * 40}
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x10  # lands in tensor data
    damages["one bit flipped in tensor data"] = bytes(flipped)
    for what, data in damages.items():
        bad = ROOT / "bad.ckpt"
        bad.write_bytes(data)
        row(f"{what}: `load_lora_checkpoint`", lambda b=bad: load_lora_checkpoint(Module, b))
        row(f"{what}: `trainer.fit(ckpt_path=...)`",
            lambda b=bad: make_trainer(ROOT, lora(), max_epochs=2, enable_checkpointing=False)
            .fit(Module(), loader(), ckpt_path=b))
    torch.save([1, 2, 3], ROOT / "list.ckpt")
    row("a valid file holding a list", lambda: load_lora_checkpoint(Module, ROOT / "list.ckpt"))
    for what, edit in [("a trained tensor missing", lambda sd: sd.pop("net.head.bias")),
                       ("an adapter tensor missing", lambda sd: sd.pop("net.fc2.lora_B")),
                       ("a wrong shape", lambda sd: sd.update({"net.head.weight": torch.zeros(3)})),
                       ("an unexpected key", lambda sd: sd.update({"net.extra": torch.zeros(2)}))]:
        ckpt = torch.load(good, weights_only=False)
        edit(ckpt["state_dict"])
        torch.save(ckpt, ROOT / "misfit.ckpt")
        row(f"{what}: `trainer.fit(ckpt_path=...)`",
            lambda: make_trainer(ROOT, lora(), max_epochs=2, enable_checkpointing=False)
            .fit(Module(), loader(), ckpt_path=ROOT / "misfit.ckpt"))
    for field, value in [("r", 4), ("alpha", 8.0), ("use_dora", True), ("bias", "all")]:
        config = LoRAConfig(**{**CONFIG.to_dict(), field: value})
        row(f"trained with `{field}={getattr(CONFIG, field)!r}`, resumed with `{value!r}`",
            lambda c=config: make_trainer(ROOT, LoRACallback(c, verbose=False), max_epochs=2,
                                          enable_checkpointing=False)
            .fit(Module(), loader(), ckpt_path=good))

    def other_base():
        module = Module()
        with torch.no_grad():
            module.net.fc1.weight.add_(0.1)
        make_trainer(ROOT, lora(), max_epochs=2, enable_checkpointing=False).fit(
            module, loader(), ckpt_path=good)

    row("adapter-only checkpoint, other base weights", other_base)


def adapter_rows() -> None:
    print("\n| adapter directory | message |\n|---|---|")
    model = Net()
    inject_lora(model, CONFIG)

    def fresh(name):
        d = ROOT / name
        save_adapter(model, d)
        return d

    d = fresh("no_config")
    (d / "adapter_config.json").unlink()
    row("`adapter_config.json` missing", lambda: read_adapter(d))
    g = fresh("garbled")
    (g / "adapter_config.json").write_text('{"r": 2,')
    row("`adapter_config.json` garbled", lambda: read_adapter(g))
    t = fresh("truncated")
    w = t / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    row("`adapter_model.safetensors` truncated", lambda: read_adapter(t))
    b = fresh("bad_setting")
    data = json.loads((b / "adapter_config.json").read_text())
    (b / "adapter_config.json").write_text(json.dumps({**data, "lora_dropout": 1.5}))
    row("`adapter_config.json` with `lora_dropout: 1.5`", lambda: read_adapter(b))
    m = fresh("garbled_meta")
    (m / "lora_lightning.json").write_text('{"r": 2,')
    row("`lora_lightning.json` garbled", lambda: read_adapter(m))

    import safetensors.torch

    real = safetensors.torch.save_file

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    safetensors.torch.save_file = full
    try:
        row("`save_adapter` on a full disk", lambda: save_adapter(model, ROOT / "no_config"))
    finally:
        safetensors.torch.save_file = real
    (ROOT / "file").write_text("x")
    row("`save_adapter` below a regular file", lambda: save_adapter(model, ROOT / "file" / "a"))


if __name__ == "__main__":
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    config_rows()
    checkpoint_rows()
    adapter_rows()
