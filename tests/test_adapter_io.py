"""Tests for adapter directories: the PEFT file layout, round trips, interoperability with
PEFT in both directions, and errors that name the offending file."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from _helpers import assert_close_fp32, is_trainable, randomize_adapters
from safetensors.torch import load_file
from torch import nn

from lora_lightning import (
    AdapterFileError,
    AdapterLoadError,
    LoRAConfig,
    LoRALayer,
    inject_lora,
    load_adapter,
    lora_layers,
    read_adapter,
    save_adapter,
)

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D


pytestmark = pytest.mark.usefixtures("one_thread")


class Sub(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)  # same name as the top-level "lin"


class Model(nn.Module):
    """Every supported base type, a nested module sharing a name suffix, and a head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lin = nn.Linear(8, 8)
        self.block = Sub()
        self.g = Conv1D(8, 8)
        self.c1 = nn.Conv1d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.g(self.block.lin(self.lin(self.emb(ids))))  # (B, L, 8)
        t = self.c1(h.transpose(1, 2))  # (B, 8, L)
        t = self.c2(t.unsqueeze(-1).expand(-1, -1, -1, 2)).mean(-1)
        return self.head(t.mean(-1))


X = torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(0))
PREFIX = "base_model.model."
TOP = ["emb", "lin", "g", "c1", "c2"]

VARIANTS = {
    "lora": {},
    "dora": {"use_dora": True},  # DoRA has no Embedding support here
    "rslora": {"use_rslora": True},
}


def our_config(variant: str, **overrides) -> LoRAConfig:
    targets = [t for t in TOP if not (variant == "dora" and t == "emb")]
    kwargs = {
        "r": 2, "alpha": 4.0, "target_modules": "|".join(targets),  # top level only
        "rank_pattern": {"lin": 3}, "alpha_pattern": {"g": 5.0}, "bias": "lora_only",
        "modules_to_save": ["head"], **VARIANTS[variant], **overrides,
    }
    return LoRAConfig(**kwargs)


def base_model(seed: int = 0) -> Model:
    torch.manual_seed(seed)
    return Model().eval()


def trained(variant: str = "lora", seed: int = 0, **overrides) -> tuple[Model, Model]:
    """(an injected and trained model, an un-injected copy of its base)."""
    model = base_model(seed)
    base = copy.deepcopy(model)
    inject_lora(model, our_config(variant, **overrides))
    randomize_adapters(model, seed + 100, select=is_trainable)
    return model.eval(), base


def state(model: nn.Module) -> dict:
    return {
        "classes": {n: type(m) for n, m in model.named_modules()},
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "config": [m.__dict__.get("_lora_config") for m in model.modules()],
    }


def assert_state(model: nn.Module, before: dict) -> None:
    now = state(model)
    assert now["classes"] == before["classes"]
    assert now["grad"] == before["grad"]
    assert now["config"] == before["config"]
    assert set(now["tensors"]) == set(before["tensors"])
    for k, v in before["tensors"].items():
        assert torch.equal(now["tensors"][k], v), k


# -- our own round trip ----------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_load_round_trip_into_fresh_model(variant, tmp_path):
    model, base = trained(variant)
    y = model(X)
    save_adapter(model, tmp_path)
    fresh = copy.deepcopy(base)
    assert load_adapter(fresh, tmp_path) is fresh
    fresh.eval()
    assert set(lora_layers(fresh)) == set(lora_layers(model))  # not block.lin
    assert {n: m.r for n, m in lora_layers(fresh).items()} == {
        n: m.r for n, m in lora_layers(model).items()
    }
    assert fresh.lin.r == 3 and fresh.c1.r == 2
    assert fresh.g.alpha == 5.0 and fresh.lin.alpha == 4.0
    torch.testing.assert_close(fresh(X), y, rtol=0, atol=1e-6)
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}


def test_load_into_injected_model_replaces_adapters(tmp_path):
    model, base = trained("lora", seed=0)
    save_adapter(model, tmp_path)
    other = copy.deepcopy(base)
    inject_lora(other, our_config("lora"))
    load_adapter(other, tmp_path)
    torch.testing.assert_close(other.eval()(X), model(X), rtol=0, atol=1e-6)


def test_read_adapter_gives_config_and_our_keys(tmp_path):
    model, _ = trained("dora")
    save_adapter(model, tmp_path)
    cfg, sd = read_adapter(tmp_path)
    assert isinstance(cfg, LoRAConfig)
    assert (cfg.r, cfg.alpha, cfg.use_dora, cfg.bias) == (2, 4.0, True, "lora_only")
    assert cfg.modules_to_save == ["head"]
    ours = {k: v for k, v in model.state_dict().items() if k in sd}
    assert set(sd) == set(ours)
    assert all(torch.equal(sd[k], ours[k]) for k in sd)


def test_save_overwrites_and_leaves_no_temporary_files(tmp_path):
    model, _ = trained("lora", seed=0)
    save_adapter(model, tmp_path / "a" / "b")
    randomize_adapters(model, 7, select=is_trainable)
    save_adapter(model, tmp_path / "a" / "b")
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "lora_lightning.json",
    ]
    _, sd = read_adapter(tmp_path / "a" / "b")
    assert torch.equal(sd["lin.lora_B"], model.lin.lora_B.detach())


def test_save_needs_lora_layers(tmp_path):
    with pytest.raises(ValueError, match=r"save_adapter: the model has no LoRA layers"):
        save_adapter(base_model(), tmp_path)
    assert list(tmp_path.iterdir()) == []


# -- file layout -----------------------------------------------------------------------
def expected_keys(variant: str) -> dict[str, tuple[int, ...]]:
    lora_r = {"lin": 3}
    keys: dict[str, tuple[int, ...]] = {}
    if variant != "dora":
        keys["emb.lora_embedding_A"] = (2, 10)
        keys["emb.lora_embedding_B"] = (8, 2)
    kernels = {"lin": (), "g": (), "c1": (3,), "c2": (3, 3)}
    for name, k in kernels.items():
        r = lora_r.get(name, 2)
        keys[f"{name}.lora_A.weight"] = (r, 8, *k)
        keys[f"{name}.lora_B.weight"] = (8, r, *([1] * len(k)))
        keys[f"{name}.base_layer.bias"] = (8,)
        if variant == "dora":
            keys[f"{name}.lora_magnitude_vector"] = (1, 8, 1) if name == "c1" else (
                (1, 8, 1, 1) if name == "c2" else (8,)
            )
    keys["head.weight"] = (3, 8)
    keys["head.bias"] = (3,)
    return {PREFIX + k: v for k, v in keys.items()}


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_file_layout(variant, tmp_path):
    model, _ = trained(variant)
    assert save_adapter(model, tmp_path) == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "lora_lightning.json",
    ]
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_keys(variant)
    assert torch.equal(tensors[PREFIX + "lin.lora_A.weight"], model.lin.lora_A.detach())
    assert torch.equal(tensors[PREFIX + "lin.base_layer.bias"], model.lin.bias.detach())
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA"
    assert (data["r"], data["lora_alpha"], data["bias"]) == (2, 4.0, "lora_only")
    assert data["use_dora"] is (variant == "dora")
    assert data["modules_to_save"] == ["head"]
    assert "lora_lightning" not in data  # ours is lora_lightning.json: PEFT warns about it
    meta = json.loads((tmp_path / "lora_lightning.json").read_text())
    paired = meta.pop("adapter_config_sha256")  # ties it to the adapter_config.json beside it
    assert paired == hashlib.sha256((tmp_path / "adapter_config.json").read_bytes()).hexdigest()
    assert LoRAConfig.from_dict(meta) == our_config(variant)
    adapted = set(lora_layers(model))
    names = [n for n, _ in model.named_modules() if n]

    def peft_pattern_matches(patterns):  # PEFT's rule: the key matches a dotted suffix
        return {n: v for n in names for k, v in patterns.items()
                if re.match(rf"(.*\.)?({k})$", n)}

    assert peft_pattern_matches(data["rank_pattern"]) == {"lin": 3}
    assert peft_pattern_matches(data["alpha_pattern"]) == {"g": 5.0}
    assert {n for n in names if re.fullmatch(data["target_modules"], n)} == adapted
    assert not re.fullmatch(data["target_modules"], "block.lin")


# -- PEFT interop ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


def peft_adapted(pm) -> dict[str, int]:
    from peft.tuners.lora import LoraLayer

    return {
        n.removeprefix(PREFIX): m.r["default"]
        for n, m in pm.named_modules() if isinstance(m, LoraLayer)
    }


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ours_loads_in_peft(variant, peft, tmp_path):
    model, base = trained(variant)
    y = model(X)
    assert not torch.allclose(y, base(X), atol=0.1)
    save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert peft_adapted(pm) == {n: m.r for n, m in lora_layers(model).items()}
    with torch.no_grad():
        assert_close_fp32(pm(X), y)


def test_peft_loads_ours_without_an_unexpected_keyword_warning(peft, tmp_path):
    """Our metadata (label names, our config) lives beside PEFT's files, not in
    adapter_config.json, where PEFT warns "Unexpected keyword arguments ['lora_lightning']
    ... pip install -U peft" about it."""
    import warnings

    model, base = trained()
    save_adapter(model, tmp_path, label_names=["sad", "flat", "glad"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    unexpected = [str(w.message) for w in caught if "Unexpected keyword" in str(w.message)]
    assert unexpected == []
    with torch.no_grad():
        assert_close_fp32(pm(X), model(X))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_peft_sees_exactly_our_ranks_for_shared_suffixes(peft, tmp_path):
    """Top-level "lin" has rank 3, nested "block.lin" rank 2: the file must not let PEFT's
    suffix matching give "block.lin" the rank of "lin"."""
    model, base = trained("lora", target_modules=["lin", "block.lin", "g"],
                          rank_pattern={"^lin": 3})
    assert (model.lin.r, model.block.lin.r) == (3, 2)
    save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert peft_adapted(pm) == {"lin": 3, "block.lin": 2, "g": 2}
    with torch.no_grad():
        assert_close_fp32(pm(X), model(X))
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)
    assert {n: m.r for n, m in lora_layers(fresh).items()} == {"lin": 3, "block.lin": 2, "g": 2}


def peft_trained(peft, variant: str, base: Model):
    """A PEFT model with random adapters (and trained biases, head, magnitudes)."""
    targets = [t for t in TOP if not (variant == "dora" and t == "emb")]
    cfg = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=targets, rank_pattern={"lin": 3},
        alpha_pattern={"g": 5.0}, bias="lora_only", modules_to_save=["head"],
        init_lora_weights=False, use_dora=variant == "dora", use_rslora=variant == "rslora",
    )
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    randomize_adapters(pm, 5, select=is_trainable)
    with torch.no_grad():  # keep outputs O(1): comparisons stay tight
        for name, p in pm.named_parameters():
            if re.search(r"lora_(embedding_)?B", name):
                p.mul_(0.25)
    return pm.eval()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_adapter_loads_here(variant, peft, tmp_path):
    base = base_model()
    pm = peft_trained(peft, variant, base)
    with torch.no_grad():
        y = pm(X)
        assert 0.5 < y.abs().max() < 5  # far from the base output, still O(1)
        assert not torch.allclose(y, base(X), atol=0.1)
    pm.save_pretrained(str(tmp_path))
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path)
    model.eval()
    # A list target also matches the nested "block.lin", in PEFT and here alike.
    assert {n: m.r for n, m in lora_layers(model).items()} == peft_adapted(pm)
    assert model.block.lin.r == 3
    assert_close_fp32(model(X), y)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_our_file_keys_match_peft_file_keys(variant, peft, tmp_path):
    base = base_model()
    targets = [t for t in TOP if not (variant == "dora" and t == "emb")]
    cfg = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules="|".join(targets), rank_pattern={"lin": 3},
        bias="lora_only", modules_to_save=["head"], use_dora=variant == "dora",
    )
    peft.get_peft_model(copy.deepcopy(base), cfg).save_pretrained(str(tmp_path / "peft"))
    peft_tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    model, _ = trained(variant)
    save_adapter(model, tmp_path / "ours")
    our_tensors = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    shapes = {k: tuple(v.shape) for k, v in peft_tensors.items()}
    assert shapes == {k: tuple(v.shape) for k, v in our_tensors.items()}
    assert shapes == expected_keys(variant)


# -- PEFT's default save of an embedding adapter (it stores the base embedding too) ----
class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(32, 16)
        self.out = nn.Linear(16, 3)

    def get_input_embeddings(self):
        return self.embed_tokens

    def get_output_embeddings(self):
        return None

    def forward(self, input_ids):
        return self.out(self.embed_tokens(input_ids).mean(1))


IDS = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))


def peft_embedder(peft, base: nn.Module, tmp_path):
    from safetensors.torch import load_file

    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["embed_tokens"]))
    randomize_adapters(pm)
    pm.save_pretrained(str(tmp_path))  # default save_embedding_layers="auto"
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.embed_tokens.base_layer.weight" in keys  # the case at issue
    with torch.no_grad():
        return pm.eval()(IDS)


def embedder() -> nn.Module:
    torch.manual_seed(0)
    return Embedder().eval()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_peft_default_save_of_an_embedding_adapter_loads(peft, tmp_path):
    base = embedder()
    y = peft_embedder(peft, base, tmp_path)
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path)
    with torch.no_grad():
        assert_close_fp32(model.eval()(IDS), y)
    assert torch.equal(model.embed_tokens.weight, base.embed_tokens.weight)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_peft_embedding_save_with_another_base_is_refused_or_applied(peft, tmp_path):
    """The saved base embedding differs from ours: refused naming it, or applied."""
    base = embedder()
    y = peft_embedder(peft, base, tmp_path)
    load_adapter(copy.deepcopy(base), tmp_path)  # on the same base it loads (test above)
    model = copy.deepcopy(base)
    with torch.no_grad():
        model.embed_tokens.weight.add_(1.0)
    try:
        load_adapter(model, tmp_path)
    except Exception as err:
        assert "embed_tokens" in str(err)
        return
    with torch.no_grad():
        assert_close_fp32(model.eval()(IDS), y)


# -- errors ----------------------------------------------------------------------------
def _saved(tmp_path: Path) -> Path:
    model, _ = trained("lora")
    return save_adapter(model, tmp_path / "adapter")


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def _missing_dir(d):
    return d.parent / "nope", r"adapter directory '.*nope' does not exist"


def _missing_config(d):
    (d / "adapter_config.json").unlink()
    return d, r"adapter_config\.json: missing; an adapter directory needs adapter_config\.json"


def _garbled_json(d):
    (d / "adapter_config.json").write_text('{"r": 2,, "peft_type"')
    return d, r"adapter_config\.json: not valid JSON"


def _binary_json(d):
    (d / "adapter_config.json").write_bytes(b"\xff\xfe\x00garbage")
    return d, r"adapter_config\.json: not valid JSON"


def _json_not_object(d):
    (d / "adapter_config.json").write_text("[1, 2]")
    return d, r"adapter_config\.json: expected a JSON object, got list"


def _truncated_weights(d):
    path = d / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return d, r"adapter_model\.safetensors: unreadable safetensors file"


def _tiny_weights(d):
    path = d / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:5])
    return d, r"adapter_model\.safetensors: unreadable safetensors file"


def _missing_weights(d):
    (d / "adapter_model.safetensors").unlink()
    return d, r"adapter_model\.safetensors: missing"


def _peft_type(d):
    _edit_config(d, peft_type="LOHA")
    return d, r"adapter_config\.json: peft_type is 'LOHA'; only 'LORA' adapters load here"


def _layers_to_transform(d):
    _edit_config(d, layers_to_transform=[0, 1])
    return d, (r"adapter_config\.json: field 'layers_to_transform' is \[0, 1\], a PEFT feature "
               r"lora-lightning does not implement")


def _lora_bias(d):
    _edit_config(d, lora_bias=True)
    return d, r"adapter_config\.json: field 'lora_bias' is True"


def _required_field(d):
    _edit_config(d, r=...)
    return d, r"adapter_config\.json: required field 'r' is missing"


def _invalid_setting(d):
    _edit_config(d, lora_dropout=1.5)
    return d, (r"adapter_config\.json: invalid LoRA settings: LoRAConfig\.dropout: got 1\.5")


FILE_ERRORS = [
    _missing_dir, _missing_config, _garbled_json, _binary_json, _json_not_object,
    _truncated_weights, _tiny_weights, _missing_weights, _peft_type, _layers_to_transform,
    _lora_bias, _required_field, _invalid_setting,
]


@pytest.mark.parametrize("breaker", FILE_ERRORS, ids=lambda f: f.__name__.strip("_"))
def test_file_errors_name_the_file_and_leave_model_unchanged(breaker, tmp_path):
    directory, pattern = breaker(_saved(tmp_path))
    with pytest.raises(AdapterFileError, match=pattern) as info:
        read_adapter(directory)
    message = str(info.value)
    named = directory if breaker is _missing_dir else None
    if named is None:
        named = directory / ("adapter_model.safetensors" if "safetensors" in pattern
                             else "adapter_config.json")
    assert str(named) in message
    model = base_model()
    model.emb.requires_grad_(False)  # a flag that must survive the failed load
    before = state(model)
    with pytest.raises(AdapterFileError, match=pattern):
        load_adapter(model, directory)
    assert_state(model, before)
    assert not any(isinstance(m, LoRALayer) for m in model.modules())


def test_failed_load_of_mismatched_adapter_leaves_fresh_model_unchanged(tmp_path):
    directory = _saved(tmp_path)
    model = base_model()
    model.c2 = nn.Conv2d(8, 4, 3, padding=1)  # c2 adapters no longer fit
    model.lin.requires_grad_(False)
    before = state(model)
    with pytest.raises(AdapterLoadError, match=r"shape mismatch for 'c2\.lora_B'"):
        load_adapter(model, directory)
    assert_state(model, before)
    assert lora_layers(model) == {}


def test_failed_load_of_adapter_with_foreign_modules_to_save_leaves_model_unchanged(tmp_path):
    directory = _saved(tmp_path)
    _edit_config(directory, modules_to_save=["classifier"])
    model = base_model()
    before = state(model)
    with pytest.raises(ValueError, match=r"LoRAConfig\.modules_to_save: got \['classifier'\]"):
        load_adapter(model, directory)
    assert_state(model, before)


def test_failed_load_into_injected_model_leaves_it_unchanged(tmp_path):
    model, _ = trained("lora", seed=0)
    directory = _saved(tmp_path)
    del_key = PREFIX + "g.lora_B.weight"
    from safetensors.torch import save_file

    tensors = load_file(str(directory / "adapter_model.safetensors"))
    del tensors[del_key]
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    before = state(model)
    with pytest.raises(AdapterLoadError, match=r"missing adapter keys \['g\.lora_B'\]"):
        load_adapter(model, directory)
    assert_state(model, before)


# -- label names travel with a classifier adapter ---------------------------------------
def test_label_names_round_trip_and_leave_loading_unchanged(tmp_path):
    from lora_lightning.io.adapter_files import read_label_names

    model, base = trained()
    save_adapter(model, tmp_path / "plain")
    save_adapter(model, tmp_path / "named", label_names=["sad", "flat", "glad"])
    assert read_label_names(tmp_path / "plain") is None
    assert read_label_names(tmp_path / "named") == ["sad", "flat", "glad"]
    # The names sit in our own file only: PEFT's config and the weights are the same.
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "named" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    plain, named = (json.loads((tmp_path / d / "lora_lightning.json").read_text())
                    for d in ("plain", "named"))
    assert named.pop("label_names") == ["sad", "flat", "glad"]
    assert named == plain
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "named")
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))


@pytest.mark.parametrize("names", ["sad", ["sad"], ["sad", "sad", "glad"], ["sad", 3, "glad"],
                                   ["sad", "", "glad"]])
def test_bad_label_names_are_refused_naming_the_value(tmp_path, names):
    from lora_lightning.errors import ArgumentError
    from lora_lightning.io.adapter_files import read_label_names

    model, _ = trained()
    with pytest.raises(ArgumentError, match=r"save_adapter\.label_names: got .*expected a list"):
        save_adapter(model, tmp_path / "a", label_names=names)
    assert not (tmp_path / "a").exists()
    save_adapter(model, tmp_path / "b", label_names=["x", "y", "z"])
    path = tmp_path / "b" / "lora_lightning.json"
    data = json.loads(path.read_text())
    data["label_names"] = names
    path.write_text(json.dumps(data))
    with pytest.raises(AdapterFileError, match=r"field 'label_names' is .*expected a list"
                       ) as info:
        read_label_names(tmp_path / "b")
    assert info.value.field == "label_names" and str(path) in str(info.value)
    with pytest.raises(AdapterFileError, match=r"field 'label_names' is .*expected a list"):
        read_adapter(tmp_path / "b")  # loading checks it too


def _as_written_before(directory: Path) -> Path:
    """``directory`` as earlier versions wrote it: our metadata as a "lora_lightning"
    section of adapter_config.json, no lora_lightning.json."""
    meta = directory / "lora_lightning.json"
    _edit_config(directory, lora_lightning=json.loads(meta.read_text()))
    meta.unlink()
    return directory


def test_a_directory_written_before_lora_lightning_json_keeps_its_metadata(tmp_path):
    from lora_lightning.io.adapter_files import read_label_names

    model, base = trained()
    old = _as_written_before(save_adapter(model, tmp_path / "old", label_names=["a", "b", "c"]))
    assert read_label_names(old) == ["a", "b", "c"]
    assert read_adapter(old)[0] == read_adapter(save_adapter(model, tmp_path / "new"))[0]
    with torch.no_grad():
        assert_close_fp32(load_adapter(copy.deepcopy(base), old)(X), model(X))
    _edit_config(old, lora_lightning={"label_names": ["a"]})  # checked as before
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json: field "
                                               r"lora_lightning\.label_names is \['a'\]"):
        read_label_names(old)
    # Saving again moves the metadata out of adapter_config.json.
    save_adapter(model, old, label_names=["x", "y", "z"])
    assert "lora_lightning" not in json.loads((old / "adapter_config.json").read_text())
    assert read_label_names(old) == ["x", "y", "z"]


def test_lora_lightning_json_and_an_old_section_that_disagree_are_refused(tmp_path):
    """A lora_lightning.json without the SHA-256 of its adapter_config.json cannot tell
    which of the two is newer: where both hold label names they must agree."""
    from lora_lightning.io.adapter_files import read_label_names

    model, _ = trained()
    directory = save_adapter(model, tmp_path / "a", label_names=["a", "b", "c"])
    path = directory / "lora_lightning.json"
    meta = json.loads(path.read_text())
    del meta["adapter_config_sha256"]
    path.write_text(json.dumps(meta))
    _edit_config(directory, lora_lightning=meta)  # the same: fine
    assert read_label_names(directory) == ["a", "b", "c"]
    _edit_config(directory, lora_lightning={**meta, "label_names": ["c", "b", "a"]})
    with pytest.raises(AdapterFileError, match=r"lora_lightning\.json: its label names \['a', "
                       r"'b', 'c'\] differ from \['c', 'b', 'a'\], in the 'lora_lightning' "
                       r"section of .*adapter_config\.json"):
        read_label_names(directory)


def test_metadata_left_from_an_earlier_save_is_ignored_with_a_warning(tmp_path):
    """PEFT's save_pretrained (or any other writer) replaces adapter_config.json and the
    weights but leaves lora_lightning.json: its label names belong to the old adapter."""
    import warnings

    peft = pytest.importorskip("peft")
    from lora_lightning.io.adapter_files import read_label_names

    model, _ = trained()
    directory = save_adapter(model, tmp_path / "a", label_names=["a", "b", "c"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the pair as saved: no warning
        assert read_label_names(directory) == ["a", "b", "c"]
    other = peft.get_peft_model(base_model(), peft.LoraConfig(r=4, target_modules=["lin"]))
    other.save_pretrained(str(directory))
    assert (directory / "lora_lightning.json").is_file()
    with pytest.warns(UserWarning, match=r"lora_lightning\.json was saved with another "
                      r"adapter_config\.json .*PEFT's save_pretrained.*ignored"):
        assert read_label_names(directory) is None
    with pytest.warns(UserWarning, match="ignored"):
        config, _ = read_adapter(directory)
    assert config.r == 4  # PEFT's adapter, not the one the stale file describes


@pytest.mark.parametrize("kind", ["directory", "broken link", "pipe"])
def test_a_lora_lightning_json_that_is_not_a_file_is_refused(tmp_path, kind):
    import os

    model, _ = trained()
    directory = save_adapter(model, tmp_path / "a", label_names=["a", "b", "c"])
    path = directory / "lora_lightning.json"
    path.unlink()
    if kind == "directory":
        path.mkdir()
    elif kind == "broken link":
        path.symlink_to(tmp_path / "nowhere.json")
    else:
        os.mkfifo(path)  # never opened: reading it would block
    fresh = base_model()
    before = state(fresh)
    with pytest.raises(AdapterFileError, match=r"lora_lightning\.json: not a regular file"):
        load_adapter(fresh, directory)
    assert_state(fresh, before)


def test_saving_over_a_directory_in_the_way_changes_nothing(tmp_path):
    model, _ = trained()
    directory = save_adapter(model, tmp_path / "a")
    files = {p.name: p.read_bytes() for p in directory.iterdir()}
    (directory / "lora_lightning.json").unlink()
    (directory / "lora_lightning.json").mkdir()
    randomize_adapters(model, 5, select=is_trainable)
    with pytest.raises(OSError, match=r"a directory is in the way of the file; save_adapter "
                       r"wrote nothing"):
        save_adapter(model, directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()} == {
        k: v for k, v in files.items() if k != "lora_lightning.json"}


def _meta_not_object(path):
    path.write_text("[1, 2]")
    return r"expected a JSON object of LoRAConfig fields and 'label_names', got list", None


def _meta_garbled(path):
    path.write_text('{"r": 2,, "label_names"')
    return r"not valid JSON .*Save the adapter again with save_adapter, or delete", None


def _meta_binary(path):
    path.write_bytes(b"\xff\xfe\x00garbage")
    return r"not valid JSON", None


def _meta_too_long(path):
    path.write_text('{"label_names": ["a", "b"], "r": 2' + " " * (1 << 20) + "}")
    return r"1,048,\d+ characters, more than the 1,048,576 characters a lora_lightning\.json", None


def _meta_huge(path):
    with open(path, "wb") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB of zero bytes, never read whole
    return r"over 4,194,304 bytes, more than the 1,048,576 characters", None


def _meta_deep(path):
    path.write_text('{"r": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return r"nested too deeply", None


def _meta_unknown_key(path):
    path.write_text(json.dumps({**json.loads(path.read_text()), "labels": ["a", "b"]}))
    return r"field 'labels': LoRAConfig: unknown field\(s\) \['labels'\]", "labels"


def _meta_bad_value(path):
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": "8"}))
    return r"field 'r': LoRAConfig\.r: got '8'", "r"


def _meta_long_number(path):
    path.write_text(path.read_text().replace('"r": 2', '"r": ' + "9" * 5000))
    return r"field 'r': LoRAConfig\.r: got <a 5,000-digit number>", "r"


def _meta_bad_labels(path):
    path.write_text(json.dumps({**json.loads(path.read_text()), "label_names": ["a", "a"]}))
    return r"field 'label_names' is \['a', 'a'\]: it holds a name twice", "label_names"


META_ERRORS = [_meta_not_object, _meta_garbled, _meta_binary, _meta_too_long, _meta_huge,
               _meta_deep, _meta_unknown_key, _meta_bad_value, _meta_long_number,
               _meta_bad_labels]


@pytest.mark.parametrize("breaker", META_ERRORS, ids=lambda f: f.__name__.strip("_"))
def test_a_malformed_lora_lightning_json_is_refused_before_the_model_changes(breaker, tmp_path):
    from lora_lightning.io.adapter_files import load_adapters, read_label_names

    model, _ = trained()
    directory = save_adapter(model, tmp_path / "set" / "b", label_names=["a", "b", "c"])
    save_adapter(model, tmp_path / "set")  # load_adapters: "default" at the top, "b" below
    path = directory / "lora_lightning.json"
    pattern, field = breaker(path)
    for read in (read_adapter, read_label_names):
        with pytest.raises(AdapterFileError, match=pattern) as info:
            read(directory)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
        assert (info.value.path, info.value.field) == (str(path), field)
    for load in (lambda m: load_adapter(m, directory), lambda m: load_adapters(m, tmp_path / "set")):
        fresh = base_model()
        before = state(fresh)
        with pytest.raises(AdapterFileError, match=pattern):
            load(fresh)
        assert_state(fresh, before)
