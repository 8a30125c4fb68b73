"""Every load is all-or-nothing (issue 18): the attack and careless-user scripts, one test
per item, each checking that the refusal is a ``LoRAError`` naming what is wrong and that
the model is exactly as before (``_helpers.assert_unchanged``).

The model is the issue's: ``fc1`` 4→8, ``fc2`` 8→8, ``head`` 8→2, adapted with
``LoRAConfig(r=2, target_modules=["fc1", "fc2"], modules_to_save=["head"])``.
"""

from __future__ import annotations

import json
import warnings

import lightning as L
import pytest
import torch
from _helpers import assert_close_fp32, assert_unchanged, randomize_adapters, snapshot_model
from _tiny import TinyTraining
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_lightning import (
    AdapterFileError,
    AdapterLoadError,
    AdapterNameError,
    AdapterTensorError,
    BaseWeightsInAdapterCheckpointError,
    LoRACallback,
    LoRAConfig,
    LoRAError,
    PerSampleBatchError,
    RankTooLargeError,
    StateDictMismatchError,
    adapter_state_dict,
    inject_lora,
    list_adapters,
    load_adapter,
    load_adapter_state_dict,
    load_adapters,
    load_lora_checkpoint,
    lora_layers,
    per_sample_adapters,
    save_adapter,
    save_adapters,
)
from lora_lightning.checkpoint.meta import META_KEY, checkpoint_meta, strip_to_adapter
from lora_lightning.checkpoint.transaction import model_transaction

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = LoRAConfig(r=2, target_modules=["fc1", "fc2"], modules_to_save=["head"])
X = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))


class Module(TinyTraining, L.LightningModule):
    def __init__(self, seed: int = 0, classes: int = 2) -> None:
        super().__init__()
        torch.manual_seed(seed)  # the same base weights for the same seed
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, classes)
        self.snapshot = None

    def on_load_checkpoint(self, checkpoint):
        # runs just before LoRA's load hook and the Trainer's strict load_state_dict
        self.snapshot = snapshot_model(self)


def trained(config: LoRAConfig = CONFIG, seed: int = 1) -> Module:
    model = Module()
    inject_lora(model, config)
    randomize_adapters(model, seed=seed, adapter="default")
    return model


def write_ckpt(path, model: Module, mode: str = "adapter", edit=None):
    """A LoRA training checkpoint as the callback writes it (state dict, metadata)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    meta = checkpoint_meta(model, _config(model), mode)
    if mode == "adapter":
        strip_to_adapter(model, state)
    ckpt = {"state_dict": state, META_KEY: meta, "hyper_parameters": {}}
    if edit is not None:
        edit(ckpt)
    torch.save(ckpt, path)
    return path


def _config(model):
    from lora_lightning.registry import find_config

    return find_config(model)


def refused(call, model, error=LoRAError):
    """``call()`` raises ``error`` and leaves ``model`` exactly as it was."""
    before = snapshot_model(model)
    with pytest.raises(LoRAError) as info:
        call()
    assert_unchanged(model, before)
    assert isinstance(info.value, error), repr(info.value)
    return info.value


# -- item 2: meta, sparse, quantized tensors in a checkpoint's state dict -----------------
KINDS = {
    "meta": lambda t: torch.empty(t.shape, device="meta"),
    "sparse": lambda t: t.to_sparse(),
    "quantized": lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8),
    "complex": lambda t: t.to(torch.complex64),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("mode", ["adapter", "full"])
def test_item2_a_tensor_of_another_kind_is_refused_before_any_copy(tmp_path, kind, mode):
    def edit(ckpt):  # the last key in load order: torch copied every other one first
        ckpt["state_dict"]["head.weight"] = KINDS[kind](ckpt["state_dict"]["head.weight"])

    path = write_ckpt(tmp_path / "bad.ckpt", trained(), mode, edit)
    target = Module()
    inject_lora(target, CONFIG)
    err = refused(lambda: load_lora_checkpoint(target, path), target, AdapterLoadError)
    assert "head.weight" in str(err) and str(path) in str(err)


@pytest.mark.parametrize("kind", ["meta", "sparse"])
def test_item2_trainer_resume_refuses_it_before_any_copy(tmp_path, kind):
    def edit(ckpt):
        ckpt["state_dict"]["head.weight"] = KINDS[kind](ckpt["state_dict"]["head.weight"])

    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(8, 4, generator=g),
                                    torch.randint(0, 2, (8,), generator=g)), batch_size=4)

    def trainer(steps):
        return L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=tmp_path, callbacks=[LoRACallback(
                             CONFIG, save_mode="full", verbose=False)])

    first = Module()
    t = trainer(1)
    t.fit(first, data)
    t.save_checkpoint(tmp_path / "good.ckpt")
    ckpt = torch.load(tmp_path / "good.ckpt", weights_only=False)
    edit(ckpt)
    torch.save(ckpt, tmp_path / "bad.ckpt")
    module = Module()
    with pytest.raises(StateDictMismatchError, match=r"'head\.weight'"):
        trainer(2).fit(module, data, ckpt_path=tmp_path / "bad.ckpt")
    assert module.snapshot is not None
    assert_unchanged(module, module.snapshot)


# -- item 3: a refused load_lora_checkpoint(instance) leaves it as it was ----------------
def _rank(ckpt):
    ckpt[META_KEY]["ranks"]["fc1"] = 3


def _targets(ckpt):
    ckpt[META_KEY]["injected"] = ["fc1"]


def _version(ckpt):
    ckpt[META_KEY]["version"] = 99


def _shape(ckpt):
    ckpt["state_dict"]["fc1.lora_A"] = torch.zeros(2, 5)


def _missing_base(ckpt):  # a "full" checkpoint without its base weights
    ckpt[META_KEY]["mode"] = "full"


@pytest.mark.parametrize("edit", [_rank, _targets, _version, _shape, _missing_base, None])
def test_item3_a_refused_load_into_an_instance_leaves_it_uninjected(tmp_path, edit):
    source = trained()
    other_base = edit is None  # the fingerprint: the right file, another base model
    path = write_ckpt(tmp_path / "bad.ckpt", source, "adapter", edit)
    target = Module(seed=7) if other_base else Module()
    refused(lambda: load_lora_checkpoint(target, path), target)
    assert not lora_layers(target)
    assert all(p.requires_grad for p in target.parameters())
    # and the genuine file still loads into it afterwards
    if not other_base:
        good = write_ckpt(tmp_path / "good.ckpt", source)
        load_lora_checkpoint(target, good)
        assert_close_fp32(target(X), source.eval()(X))


# -- item 4: base_checkpoint= that half-fits ---------------------------------------------
@pytest.mark.parametrize("as_instance", [True, False])
def test_item4_a_half_fitting_base_checkpoint_changes_nothing(tmp_path, as_instance):
    good = write_ckpt(tmp_path / "good.ckpt", trained())
    base = {k: v + 1.0 for k, v in Module(seed=3).state_dict().items()}
    base["head.weight"] = torch.zeros(3, 8)  # the last key; the others fit
    torch.save({"state_dict": base}, tmp_path / "base.ckpt")
    target = Module()
    if as_instance:
        err = refused(lambda: load_lora_checkpoint(target, good,
                                                   base_checkpoint=tmp_path / "base.ckpt"),
                      target, StateDictMismatchError)
    else:
        with pytest.raises(StateDictMismatchError) as info:
            load_lora_checkpoint(Module, good, base_checkpoint=tmp_path / "base.ckpt")
        err = info.value
    assert "base.ckpt" in str(err) and "head.weight" in str(err)


# -- item 5: a huge rank in adapter_config.json ------------------------------------------
def test_item5_a_huge_rank_is_refused_before_anything_is_allocated(tmp_path, monkeypatch):
    source = trained()
    directory = save_adapter(source, tmp_path / "adapter")
    cfg = json.loads((directory / "adapter_config.json").read_text())
    (tmp_path / "huge").mkdir()
    (tmp_path / "huge" / "adapter_model.safetensors").write_bytes(
        (directory / "adapter_model.safetensors").read_bytes())
    (tmp_path / "huge" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 2**22}))
    from lora_lightning.layers.base import LoRALayer

    allocations = []
    real = LoRALayer.add_adapter
    monkeypatch.setattr(LoRALayer, "add_adapter",
                        lambda self, name, r, *a, **k: (allocations.append(r),
                                                        real(self, name, r, *a, **k))[1])
    target = Module()
    err = refused(lambda: load_adapter(target, tmp_path / "huge"), target, AdapterFileError)
    assert allocations == []  # refused before the first adapter was made
    assert err.field == "r" and "adapter_config.json" in err.path
    assert isinstance(err.__cause__, RankTooLargeError) and err.__cause__.layer == "fc1"
    load_adapter(target, directory)  # a genuine adapter still loads
    assert_close_fp32(target(X), source.eval()(X))


# -- item 7: base_weights="apply" --------------------------------------------------------
def _with_base_weights(directory, tensors):
    path = directory / "adapter_model.safetensors"
    state = load_file(str(path))
    state.update({f"base_model.model.{k}": v for k, v in tensors.items()})
    save_file(state, str(path))


def test_item7_apply_refuses_before_copying_any_base_weight(tmp_path):
    directory = save_adapter(trained(), tmp_path / "adapter")
    _with_base_weights(directory, {"fc1.base_layer.weight": torch.ones(8, 4),  # fits
                                   "fc2.base_layer.weight": torch.ones(3, 3)})  # does not
    target = Module()
    err = refused(lambda: load_adapter(target, directory, base_weights="apply"), target,
                  AdapterLoadError)
    assert "fc2.weight" in str(err)


def test_item7_a_failure_after_the_base_copy_is_rolled_back(tmp_path, monkeypatch):
    """The transaction restores base weights even when the failure comes after them."""
    directory = save_adapter(trained(), tmp_path / "adapter")
    _with_base_weights(directory, {"fc1.base_layer.weight": torch.ones(8, 4)})
    import lora_lightning.io.adapter_files as files

    def fail(model, *a, **k):
        raise AdapterLoadError("late failure")

    monkeypatch.setattr(files, "activate", fail)  # runs last, when adding beside another
    target = Module()
    inject_lora(target, CONFIG, "other")
    refused(lambda: load_adapter(target, directory, base_weights="apply", adapter="new"),
            target)


# -- item 8: load_adapters ---------------------------------------------------------------
@pytest.mark.parametrize("bad", ["r0", "bad-name", "default"])
def test_item8_load_adapters_is_all_or_nothing(tmp_path, bad):
    top = tmp_path / "set"
    save_adapter(trained(), top)  # "default"
    save_adapter(trained(seed=2), top / "a_first")
    sub = top / bad
    save_adapter(trained(seed=3), sub)
    if bad == "r0":
        cfg = json.loads((sub / "adapter_config.json").read_text())
        (sub / "adapter_config.json").write_text(json.dumps({**cfg, "r": 0}))
    target = Module()
    refused(lambda: load_adapters(target, top), target)
    assert list_adapters(target) == []


# -- item 10: base weights in an adapter-only checkpoint ---------------------------------
@pytest.mark.parametrize("as_instance", [True, False])
def test_item10_an_adapter_only_checkpoint_never_overwrites_a_base_weight(tmp_path,
                                                                         as_instance):
    def edit(ckpt):
        ckpt["state_dict"]["fc1.weight"] = torch.full((8, 4), 7.0)

    path = write_ckpt(tmp_path / "bad.ckpt", trained(), "adapter", edit)
    if as_instance:
        target = Module()
        err = refused(lambda: load_lora_checkpoint(target, path), target,
                      BaseWeightsInAdapterCheckpointError)
    else:
        with pytest.raises(BaseWeightsInAdapterCheckpointError) as info:
            load_lora_checkpoint(Module, path)
        err = info.value
    assert err.keys == ["fc1.weight"] and err.source == str(path)


# -- ranks larger than a layer: one rule, and PEFT's files load ---------------------------
def test_one_rank_rule_for_inject_and_load(tmp_path):
    config = LoRAConfig(r=4, target_modules=["fc1", "head"])
    model = Module(classes=3)
    with pytest.warns(UserWarning, match=r"rank 4 for 'head' is larger than the layer's "
                                         r"smaller size \(3"):
        inject_lora(model, config)
    randomize_adapters(model)
    directory = save_adapter(model, tmp_path / "a")
    fresh = Module(classes=3)
    with pytest.warns(UserWarning, match=r"'head'"):
        load_adapter(fresh, directory)
    assert_close_fp32(fresh(X), model(X))
    huge = LoRAConfig(r=65, target_modules=["head"])
    plain = Module(classes=3)
    err = refused(lambda: inject_lora(plain, huge), plain, RankTooLargeError)
    assert (err.layer, err.value, err.limit) == ("head", 65, 64)


@pytest.fixture
def peft():
    return pytest.importorskip("peft")


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc1(x)))


def test_a_peft_adapter_with_a_rank_above_a_small_head_gives_peft_outputs(peft, tmp_path):
    import copy

    base = Plain().eval()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["fc1", "head"]))
    randomize_adapters(pm)
    pm.save_pretrained(str(tmp_path))
    with torch.no_grad():
        expected = pm.eval()(X)
    model = copy.deepcopy(base)
    with pytest.warns(UserWarning, match=r"'head'"):
        load_adapter(model, tmp_path)
    assert {n: m.r for n, m in lora_layers(model).items()} == {"fc1": 4, "head": 4}
    with torch.no_grad():
        assert_close_fp32(model(X), expected)


def test_a_peft_all_linear_bert_adapter_on_a_3_class_head_loads(peft, tmp_path):
    transformers = pytest.importorskip("transformers")
    import copy

    cfg = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16,
                                  max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(cfg).eval()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_adapters(pm)
    pm.save_pretrained(str(tmp_path))
    ids = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = pm.eval()(input_ids=ids).logits
    model = copy.deepcopy(base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_adapter(model, tmp_path)
    assert any("'classifier'" in str(w.message) for w in caught)
    with torch.no_grad():
        assert_close_fp32(model(input_ids=ids).logits, expected)


# -- weaker: tensor dtypes and values, names, batch sizes ---------------------------------
BAD_TENSORS = {
    "nan": lambda t: t.clone().fill_(float("nan")),
    "inf": lambda t: t.clone().fill_(float("inf")),
    "int": lambda t: t.to(torch.int32),
    "float64": lambda t: t.to(torch.float64),
    "fp8": lambda t: t.to(torch.float8_e4m3fn),
    "bool": lambda t: t > 0,
}


@pytest.mark.parametrize("bad", list(BAD_TENSORS))
def test_an_adapter_file_tensor_of_a_bad_dtype_or_value_is_refused(tmp_path, bad):
    directory = save_adapter(trained(), tmp_path / "a")
    path = directory / "adapter_model.safetensors"
    state = load_file(str(path))
    key = next(k for k in sorted(state) if "fc2.lora_B" in k)
    state[key] = BAD_TENSORS[bad](state[key])
    save_file(state, str(path))
    target = Module()
    err = refused(lambda: load_adapter(target, directory), target, AdapterTensorError)
    assert err.source == str(path) and err.key == "fc2.lora_B"


def test_nonfinite_values_load_with_the_explicit_opt_in(tmp_path):
    directory = save_adapter(trained(), tmp_path / "a")
    path = directory / "adapter_model.safetensors"
    state = load_file(str(path))
    key = next(k for k in sorted(state) if "fc2.lora_B" in k)
    state[key] = BAD_TENSORS["nan"](state[key])
    save_file(state, str(path))
    target = Module()
    load_adapter(target, directory, allow_nonfinite=True)
    assert target.fc2.lora_B.isnan().all()


@pytest.mark.parametrize("bad", ["nan", "complex", "float64"])
def test_a_checkpoint_and_a_state_dict_apply_the_same_rule(tmp_path, bad):
    make = {**BAD_TENSORS, "complex": lambda t: t.to(torch.complex64)}[bad]

    def edit(ckpt):
        ckpt["state_dict"]["fc1.lora_A"] = make(ckpt["state_dict"]["fc1.lora_A"])

    path = write_ckpt(tmp_path / "bad.ckpt", trained(), "adapter", edit)
    target = Module()
    refused(lambda: load_lora_checkpoint(target, path), target, AdapterLoadError)
    state = dict(adapter_state_dict(trained()))
    state["fc1.lora_A"] = make(state["fc1.lora_A"])
    model = trained(seed=5)
    err = refused(lambda: load_adapter_state_dict(model, state), model, AdapterLoadError)
    assert "fc1.lora_A" in str(err)


def test_a_float64_model_loads_its_own_float64_adapter():
    source = trained().double()
    model = trained(seed=4).double()
    load_adapter_state_dict(model, adapter_state_dict(source))
    assert torch.equal(model.fc1.lora_A, source.fc1.lora_A)


def test_modules_to_save_that_match_nothing_name_the_file(tmp_path):
    directory = save_adapter(trained(), tmp_path / "a")
    cfg_path = directory / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "modules_to_save": ["nope"]}))
    target = Module()
    err = refused(lambda: load_adapter(target, directory), target, AdapterFileError)
    assert err.path == str(cfg_path) and err.field == "modules_to_save"
    assert str(cfg_path) in str(err) and "'nope'" in str(err)


@pytest.mark.parametrize("names", [["default", None], ["default", None, "default", None]])
def test_per_sample_names_must_match_the_batch(names):
    model = trained()
    x = torch.randn(3, 4)
    with per_sample_adapters(model, names), pytest.raises(PerSampleBatchError) as info:
        model(x)
    assert (info.value.names, info.value.batch) == (len(names), 3)
    assert f"{len(names)} entries" in str(info.value) and "3 samples" in str(info.value)
    with per_sample_adapters(model, ["default", None, "default"]):
        model(x)  # the right length works, and the hooks are gone afterwards
    model(torch.randn(7, 4))


def test_save_adapters_refuses_a_too_long_name_before_writing(tmp_path):
    model = trained()
    long = "a" * 300
    inject_lora(model, CONFIG, long)
    with pytest.raises(AdapterNameError, match=r"300 bytes"):
        save_adapters(model, tmp_path / "set")
    assert not (tmp_path / "set").exists() or not any((tmp_path / "set").iterdir())


# -- the one mechanism -------------------------------------------------------------------
def test_model_transaction_restores_an_injection_exactly():
    model = trained()
    inject_lora(model, CONFIG, "second")
    before = snapshot_model(model)
    hooks = {n: dict(m._load_state_dict_pre_hooks) for n, m in model.named_modules()}
    with pytest.raises(KeyError), model_transaction(model) as tx:
        inject_lora(model, LoRAConfig(r=3, target_modules=["fc2", "head"]), "third")
        tx.keep([model.fc1.weight])
        model.fc1.weight.data.zero_()
        raise KeyError("late")
    assert_unchanged(model, before)
    assert {n: dict(m._load_state_dict_pre_hooks) for n, m in model.named_modules()} == hooks
    inject_lora(model, LoRAConfig(r=3, target_modules=["fc2", "head"]), "third")  # works
