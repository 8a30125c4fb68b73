"""Files are untrusted input (issue 18): hyperparameters are never resolved by surprise
(item 1), what a file can make the loader allocate is capped, regexes from files are
matched in bounded time (item 6), and every malformed field ends in one ``LoRAError``
naming the file and the field (the issue's "weaker" cases)."""

from __future__ import annotations

import json
import time

import lightning as L
import pytest
import torch
from _tiny import TinyTraining
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_lightning import (
    AdapterFileError,
    CheckpointReadError,
    ConfigError,
    LoRACallback,
    LoRAConfig,
    LoRAError,
    inject_lora,
    load_adapter,
    load_lora_checkpoint,
    read_checkpoint,
    save_adapter,
)
from lora_lightning.config import MAX_PATTERN_CHARS
from lora_lightning.errors import CheckpointFieldError, FileAllocationError, PatternError
from lora_lightning.io.peft_format import from_peft_config, parse_config_json
from lora_lightning.lightning.loading import MAX_HPARAM_BYTES

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = {"r": 2, "target_modules": ["fc1", "fc2"], "modules_to_save": ["head"]}
LONG = "encoder.layer_with_a_long_name.fc_xy"  # 36 characters, as in the issue


class Module(TinyTraining, L.LightningModule):
    def __init__(self, width: int = 8, net_cfg=None) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(4, width), nn.Linear(width, 8), nn.Linear(8, 2)


class Reduce:
    """Pickles as ``func(*args)`` without building it here."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("saved")
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(8, 4, generator=g),
                                    torch.randint(0, 2, (8,), generator=g)), batch_size=4)
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpts", save_last=True)
    L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp, callbacks=[LoRACallback(CONFIG, verbose=False), ckpt]
              ).fit(Module(), data)
    return tmp / "ckpts" / "last.ckpt"


def _variant(saved, tmp_path, name="edited.ckpt", **changes):
    data = torch.load(saved, weights_only=False)
    for key, value in changes.items():
        data[key] = value
    path = tmp_path / name
    torch.save(data, path)
    return path


def _meta_variant(saved, tmp_path, **fields):
    data = torch.load(saved, weights_only=False)
    data["lora_lightning"].update(fields)
    path = tmp_path / "meta.ckpt"
    torch.save(data, path)
    return path


# -- item 1: hyperparameters are not resolved -------------------------------------------
def test_an_eval_resolver_in_hparams_is_not_run(saved, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    OmegaConf.register_new_resolver("eval", eval)
    try:
        payload = "${eval:'open(\"RAN\", \"w\") and 1'}"
        path = _variant(saved, tmp_path, hyper_parameters=OmegaConf.create(
            {"width": 8, "net_cfg": payload}))
        with pytest.raises(CheckpointFieldError, match="OmegaConf interpolation") as info:
            load_lora_checkpoint(Module, path)
        assert info.value.field == "hyper_parameters.net_cfg"
        assert info.value.path == str(path) and str(path) in str(info.value)
        assert not (tmp_path / "RAN").exists()
        # the control: opting in resolves it, and the payload is real
        load_lora_checkpoint(Module, path, resolve_hparams=True)
        assert (tmp_path / "RAN").exists()
    finally:
        OmegaConf.clear_resolver("eval")


@pytest.mark.parametrize("container", ["dictconfig", "nested", "plain"])
def test_an_env_interpolation_does_not_copy_a_secret_into_hparams(saved, tmp_path,
                                                                   monkeypatch, container):
    monkeypatch.setenv("MY_SECRET_TOKEN", "hunter2")
    secret = "${oc.env:MY_SECRET_TOKEN}"
    hparams = {"dictconfig": OmegaConf.create({"width": 8, "net_cfg": secret}),
               "nested": {"width": 8, "net_cfg": OmegaConf.create({"token": secret})},
               "plain": {"width": 8, "net_cfg": {"token": [secret]}}}[container]
    path = _variant(saved, tmp_path, hyper_parameters=hparams)
    with pytest.raises(CheckpointFieldError, match=r"oc\.env:MY_SECRET_TOKEN") as info:
        load_lora_checkpoint(Module, path)
    assert info.value.field.startswith("hyper_parameters.net_cfg")
    assert "hunter2" not in str(info.value)
    # a value the caller gives is not read from the file at all
    model = load_lora_checkpoint(Module, path, net_cfg={"token": "mine"})
    assert model.hparams.net_cfg == {"token": "mine"}
    if container == "dictconfig":  # the control: what resolving used to do
        model = load_lora_checkpoint(Module, path, resolve_hparams=True)
        assert model.hparams.net_cfg == "hunter2"


def test_hydra_style_hparams_with_real_values_load_as_before(saved, tmp_path):
    cfg = OmegaConf.create({"depth": 2, "names": ["a", "b"], "cost": "$5"})
    path = _variant(saved, tmp_path, hyper_parameters={"width": 8, "net_cfg": cfg})
    model = load_lora_checkpoint(Module, path)
    assert model.hparams.net_cfg == cfg and OmegaConf.is_config(model.hparams.net_cfg)


def test_a_huge_hparam_value_is_refused_naming_its_key(saved, tmp_path):
    path = _variant(saved, tmp_path, hyper_parameters={
        "width": 8, "net_cfg": {"blob": b"x" * (MAX_HPARAM_BYTES + 1)}})
    with pytest.raises(CheckpointFieldError, match="hyper_parameters.net_cfg.blob") as info:
        load_lora_checkpoint(Module, path)
    assert info.value.field == "hyper_parameters.net_cfg.blob"


def test_a_bytearray_allocation_is_refused_before_unpickling(saved, tmp_path):
    path = _variant(saved, tmp_path, hyper_parameters={
        "width": 8, "net_cfg": Reduce(bytearray, 600_000_000)})
    assert path.stat().st_size < 1_000_000 * 5
    start = time.perf_counter()
    for load in (read_checkpoint, lambda p: load_lora_checkpoint(Module, p)):
        with pytest.raises(FileAllocationError, match=r"builtins\.bytearray\(600000000\)") as info:
            load(path)
        assert info.value.path == str(path)
    assert time.perf_counter() - start < 5


# -- item 6: regexes from files are matched in bounded time ------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer_with_a_long_name = nn.Module()
        self.encoder.layer_with_a_long_name.fc_xy = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)


@pytest.mark.parametrize("fields", [
    {"target_modules": "(.|.)*!"},
    {"target_modules": ["fc_xy"], "rank_pattern": {"(.|.)*!": 4}},
])
def test_a_catastrophic_regex_in_an_adapter_file_fails_fast(tmp_path, fields):
    assert len(LONG) == 36
    model = Net()
    inject_lora(model, LoRAConfig(r=2, target_modules=["fc_xy"]))
    save_adapter(model, tmp_path / "adapter")
    cfg = tmp_path / "adapter" / "adapter_config.json"
    data = json.loads(cfg.read_text())
    data.update(fields)
    cfg.write_text(json.dumps(data))
    start = time.perf_counter()
    with pytest.raises(LoRAError) as info:
        load_adapter(Net(), tmp_path / "adapter")
    assert time.perf_counter() - start < 1.0
    assert "(.|.)*!" in str(info.value)
    field = next(iter(k for k in fields if "(.|.)*!" in json.dumps(fields[k])))
    assert getattr(info.value, "field", None) == field


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules", "rank_pattern"])
def test_the_python_fallback_is_timed(monkeypatch, field):
    """Without RE2 (or for a pattern RE2 refuses), Python's re runs under a timer."""
    import lora_lightning.config as config_module

    monkeypatch.setattr(config_module, "_re2", None)
    config_module.compile_pattern.cache_clear()
    try:
        kwargs = {"target_modules": ["fc_xy"], field: "(.|.)*!"}
        if field == "rank_pattern":
            kwargs[field] = {"(.|.)*!": 4}
        start = time.perf_counter()
        with pytest.raises(PatternError, match=r"took longer than") as info:
            inject_lora(Net(), LoRAConfig(r=2, **kwargs))
        assert time.perf_counter() - start < 1.0
        assert info.value.field == field and info.value.value in ("(.|.)*!", {"(.|.)*!": 4},
                                                                  )
    finally:
        config_module.compile_pattern.cache_clear()


def test_a_lookahead_still_works():
    model = Net()
    inject_lora(model, LoRAConfig(r=2, target_modules=r"^(?!head).*fc_xy"))
    assert type(model.encoder.layer_with_a_long_name.fc_xy).__name__ != "Linear"


def test_an_overlong_regex_is_refused():
    with pytest.raises(PatternError, match="target_modules"):
        LoRAConfig(target_modules="a" * (MAX_PATTERN_CHARS + 1))


# -- weaker cases: one LoRAError naming the file and the field ---------------------------
def test_a_text_file_as_a_checkpoint(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("hello world\nthese are notes\n")
    for load in (read_checkpoint, lambda p: load_lora_checkpoint(Module, p)):
        with pytest.raises(CheckpointReadError, match="notes.ckpt") as info:
            load(path)
        assert info.value.path == str(path)


def test_allow_listed_callables_with_bad_arguments(saved, tmp_path):
    path = _variant(saved, tmp_path, extra=Reduce(set, [[1]]))
    with pytest.raises(CheckpointReadError, match=r"edited\.ckpt.*TypeError") as info:
        read_checkpoint(path)
    assert info.value.path == str(path)


@pytest.mark.parametrize(("field", "value"), [
    ("mode", 3), ("adapter", ["x"]), ("config", "r=2"), ("injected", "fc1"),
    ("ranks", {"fc1": "2"}), ("ranks", [2]), ("fingerprint", "abc"),
    ("fingerprint", {"sha256": 1, "tensors": 2}),
])
def test_malformed_lora_metadata(saved, tmp_path, field, value):
    path = _meta_variant(saved, tmp_path, **{field: value})
    with pytest.raises(CheckpointFieldError, match=f"meta.ckpt.*lora_lightning.{field}") as info:
        load_lora_checkpoint(Module, path)
    assert info.value.field == f"lora_lightning.{field}" and info.value.path == str(path)


def test_metadata_version_of_the_wrong_type(saved, tmp_path):
    path = _meta_variant(saved, tmp_path, version="1")
    with pytest.raises(LoRAError, match="meta.ckpt.*version '1'"):
        load_lora_checkpoint(Module, path)


def test_alpha_above_float32_in_a_checkpoint_is_refused_naming_the_file(saved, tmp_path):
    data = torch.load(saved, weights_only=False)
    path = _meta_variant(saved, tmp_path, config={**data["lora_lightning"]["config"],
                                                  "alpha": 1e308})
    with pytest.raises(CheckpointFieldError, match=r"meta\.ckpt.*alpha") as info:
        load_lora_checkpoint(Module, path)
    assert info.value.field == "lora_lightning.config.alpha"


def test_alpha_above_float32_in_an_adapter_config_is_refused_naming_the_file(tmp_path):
    model = Net()
    inject_lora(model, LoRAConfig(r=2, target_modules=["fc_xy"]))
    save_adapter(model, tmp_path / "adapter")
    cfg = tmp_path / "adapter" / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"lora_alpha": 16.0', '"lora_alpha": 1e308'))
    with pytest.raises(AdapterFileError, match="adapter_config.json") as info:
        load_adapter(Net(), tmp_path / "adapter")
    assert info.value.field == "lora_alpha"


def test_deep_json_in_an_adapter_config(tmp_path):
    text = '{"r": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(AdapterFileError, match="cfg.json.*nested too deeply") as info:
        parse_config_json(text, "cfg.json")
    assert info.value.path == "cfg.json"


def test_a_5000_digit_rank_in_an_adapter_config(tmp_path):
    text = json.dumps({"r": 1, "lora_alpha": 16, "target_modules": ["fc_xy"]}).replace(
        '"r": 1', '"r": ' + "9" * 5000)
    data = parse_config_json(text, "cfg.json")
    with pytest.raises(AdapterFileError, match=r"cfg\.json.*5,000-digit number.*'r'") as info:
        from_peft_config(data, "cfg.json")
    assert info.value.field == "r"


def test_every_error_here_is_a_lora_error():
    for cls in (CheckpointFieldError, FileAllocationError, PatternError):
        assert issubclass(cls, LoRAError)
    assert issubclass(PatternError, ConfigError)


@pytest.mark.parametrize("kind", ["deep", "digits"])
def test_load_adapter_refuses_deep_json_and_huge_numbers_naming_the_file(tmp_path, kind):
    """The bounded parser is what load_adapter reads adapter_config.json with."""
    from _helpers import assert_unchanged, snapshot_model

    from lora_lightning import load_adapter

    folder = tmp_path / "adapter"
    folder.mkdir()
    if kind == "deep":
        text = '{"r": ' + "[" * 100_000 + "]" * 100_000 + "}"
    else:
        text = json.dumps({"r": 1, "lora_alpha": 16, "target_modules": ["0"]}).replace(
            '"r": 1', '"r": ' + "9" * 5000)
    (folder / "adapter_config.json").write_text(text)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    before = snapshot_model(model)
    with pytest.raises(AdapterFileError, match="adapter_config.json") as info:
        load_adapter(model, folder)
    assert info.value.path.endswith("adapter_config.json")
    assert_unchanged(model, before)
