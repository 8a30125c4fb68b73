"""Fuzzing the two files a user gets from elsewhere (issue 18): an adapter directory and an
adapter-only training checkpoint, each mutated at random (bytes, JSON fields, tensor
dtypes, shapes, kinds and values, metadata types). Every load must end in one of two ways:

* refused with a ``LoRAError`` (the documented type), the model exactly as it was;
* loaded, faithfully: the model holds exactly the tensors the (mutated) file holds, each
  finite (a flipped byte inside a tensor's data is a valid file with other numbers).

Bounded for CI (derandomized, ``max_examples``, no example database): both run in well
under a minute on two cores.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import lightning as L
import pytest
import torch
from _helpers import assert_unchanged, randomize_adapters, snapshot_model
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from lora_lightning import (
    LoRAConfig,
    LoRAError,
    adapter_state_dict,
    inject_lora,
    load_adapter,
    load_lora_checkpoint,
    read_adapter,
    save_adapter,
)
from lora_lightning.checkpoint.meta import META_KEY, checkpoint_meta, strip_to_adapter

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = LoRAConfig(r=2, target_modules=["fc1", "fc2"], modules_to_save=["head"])
FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _trained() -> Module:
    model = Module()
    inject_lora(model, CONFIG)
    randomize_adapters(model, seed=1, adapter="default")
    return model


SOURCE = _trained()
_WORK = Path(tempfile.mkdtemp(prefix="lora-fuzz-"))
ADAPTER = save_adapter(SOURCE, _WORK / "adapter")
CONFIG_TEXT = (ADAPTER / "adapter_config.json").read_text()
META_TEXT = (ADAPTER / "lora_lightning.json").read_text()
WEIGHTS = load_file(str(ADAPTER / "adapter_model.safetensors"))
CKPT_STATE = {k: v.clone() for k, v in SOURCE.state_dict().items()}
strip_to_adapter(SOURCE, CKPT_STATE)
CKPT_META = checkpoint_meta(SOURCE, CONFIG, "adapter")

# -- mutations ---------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, 2, 3, 8])
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
    | st.sampled_from(["fc1", "fc2", "head", "nope", "(.*)", "default", "lora"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6)
DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8, torch.bool,
          torch.float8_e4m3fn, torch.uint8]
TENSOR_OPS = ["dtype", "transpose", "drop_row", "add_dim", "nan", "inf", "drop", "extra",
              "scalar"]
KIND_OPS = ["sparse", "meta", "quantized", "complex"]


def mutate_tensor(state: dict, data, ops: list[str]) -> None:
    key = data.draw(st.sampled_from(sorted(state)))
    op = data.draw(st.sampled_from(ops))
    t = state[key]
    if op == "dtype":
        state[key] = t.to(data.draw(st.sampled_from(DTYPES)))
    elif op == "transpose":
        state[key] = t.T.contiguous() if t.dim() == 2 else t.unsqueeze(0)
    elif op == "drop_row":
        state[key] = t[1:].contiguous()
    elif op == "add_dim":
        state[key] = t.unsqueeze(-1).contiguous()
    elif op in ("nan", "inf"):
        t = t.clone()
        t.view(-1)[data.draw(st.integers(0, t.numel() - 1))] = float(op)
        state[key] = t
    elif op == "drop":
        del state[key]
    elif op == "extra":
        state[key.replace("lora_", "lora_extra_")] = t.clone()
    elif op == "scalar":
        state[key] = torch.tensor(1.0)
    elif op == "sparse":
        state[key] = t.to_sparse()
    elif op == "meta":
        state[key] = torch.empty(t.shape, device="meta")
    elif op == "quantized":
        state[key] = torch.quantize_per_tensor(t.float(), 0.1, 0, torch.qint8)
    elif op == "complex":
        state[key] = t.to(torch.complex64)


def flip_bytes(raw: bytes, data) -> bytes:
    op = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
    at = data.draw(st.integers(0, max(0, len(raw) - 1)))
    if op == "truncate":
        return raw[:at]
    byte = bytes([data.draw(st.integers(0, 255))])
    if op == "insert":
        return raw[:at] + byte + raw[at:]
    return raw[:at] + byte + raw[at + 1:]


# -- outcomes ----------------------------------------------------------------------------
def refused_or_faithful(model, before, load, expected) -> str:
    """Run ``load()``; a refusal leaves ``model`` unchanged, a success holds exactly what
    ``expected()`` (the tensors read back from the mutated file) says."""
    try:
        load()
    except LoRAError as err:
        assert_unchanged(model, before)
        event(f"refused: {type(err).__name__}")  # pytest --hypothesis-show-statistics
        return "refused"
    event("loaded")
    loaded = adapter_state_dict(model)
    for key, value in expected().items():
        assert key in loaded, key
        assert torch.equal(loaded[key], value.to(loaded[key].dtype)), key
        assert torch.isfinite(loaded[key]).all(), key
    return "loaded"


@FUZZ
@given(data=st.data(), what=st.sampled_from(["bytes", "json", "tensor", "meta"]))
def test_mutated_adapter_directories(data, what):
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        config_text, weights, meta_text = CONFIG_TEXT, dict(WEIGHTS), META_TEXT
        if what == "meta":  # lora_lightning.json: a field's value, or its bytes
            meta = json.loads(meta_text)
            if data.draw(st.booleans()):
                field = data.draw(st.sampled_from(sorted(meta) + ["extra_field"]))
                meta[field] = data.draw(json_values)
                meta_text = json.dumps(meta)
            else:
                meta_text = flip_bytes(meta_text.encode(), data).decode("latin-1")
        (directory / "lora_lightning.json").write_text(meta_text, encoding="latin-1")
        weights_raw = None
        if what == "json":
            cfg = json.loads(config_text)
            field = data.draw(st.sampled_from(sorted(cfg) + ["extra_field"]))
            cfg[field] = data.draw(json_values)
            config_text = json.dumps(cfg)
        elif what == "tensor":
            mutate_tensor(weights, data, TENSOR_OPS)
        save_file(weights, str(directory / "adapter_model.safetensors"))
        if what == "bytes":
            name = data.draw(st.sampled_from(["adapter_config.json",
                                              "adapter_model.safetensors"]))
            if name == "adapter_config.json":
                config_text = flip_bytes(config_text.encode(), data).decode("latin-1")
            else:
                weights_raw = flip_bytes(
                    (directory / "adapter_model.safetensors").read_bytes(), data)
                (directory / "adapter_model.safetensors").write_bytes(weights_raw)
        (directory / "adapter_config.json").write_text(config_text, encoding="latin-1")
        model = Module()
        before = snapshot_model(model)
        refused_or_faithful(model, before, lambda: load_adapter(model, directory),
                            lambda: read_adapter(directory)[1])


@FUZZ
@given(data=st.data(), what=st.sampled_from(["bytes", "meta", "tensor", "kind"]))
def test_mutated_adapter_only_checkpoints(data, what):
    state = {k: v.clone() for k, v in CKPT_STATE.items()}
    meta = json.loads(json.dumps(CKPT_META))
    if what == "meta":
        path = data.draw(st.sampled_from(
            [(k,) for k in sorted(meta)] + [("config", k) for k in sorted(meta["config"])]
            + [("ranks", "fc1"), ("fingerprint", "sha256"), ("fingerprint", "tensors")]))
        holder = meta
        for part in path[:-1]:
            holder = holder[part]
        holder[path[-1]] = data.draw(json_values)
    elif what == "tensor":
        mutate_tensor(state, data, TENSOR_OPS)
    elif what == "kind":
        mutate_tensor(state, data, KIND_OPS)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter.ckpt"
        torch.save({"state_dict": state, META_KEY: meta, "hyper_parameters": {}}, path)
        if what == "bytes":
            path.write_bytes(flip_bytes(path.read_bytes(), data))
        model = Module()
        before = snapshot_model(model)
        refused_or_faithful(model, before, lambda: load_lora_checkpoint(model, path),
                            lambda: {k: v for k, v in state.items() if k in CKPT_STATE})
