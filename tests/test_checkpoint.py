"""Tests for adapter state dicts, strict adapter loading, base-checkpoint key reconciliation
and the base fingerprint."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from _helpers import assert_close_fp32, is_trainable, randomize_adapters
from torch import nn

from lora_lightning import (
    AdapterLoadError,
    LoRAConfig,
    adapter_state_dict,
    base_fingerprint,
    inject_lora,
    load_adapter_state_dict,
    lora_layers,
    merge_lora,
    unmerge_lora,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lin = nn.Linear(8, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.other = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.lin(self.emb(ids))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(self.norm(self.other(h))).sum(1)


X = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(0))
ADAPTERS = {f"{m}.lora_{ab}" for m in ("emb", "lin", "conv") for ab in "AB"}


def make(seed: int = 0, dora: bool = False, **kwargs):
    """(injected model, un-injected copy of the same base, config)."""
    torch.manual_seed(seed)
    model = Net()
    base = copy.deepcopy(model)
    targets = ["lin", "conv"] if dora else ["emb", "lin", "conv"]
    cfg = LoRAConfig(**{"r": 2, "target_modules": targets, "use_dora": dora, **kwargs})
    inject_lora(model, cfg)
    return model, base, cfg


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert set(now) == set(snap)
    for k, v in snap.items():
        assert torch.equal(now[k], v), k


# -- adapter_state_dict ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "extra"),
    [
        ({}, set()),
        ({"bias": "lora_only"}, {"lin.bias", "conv.bias"}),
        ({"bias": "all"}, {"lin.bias", "conv.bias", "other.bias", "norm.bias", "head.bias"}),
        ({"modules_to_save": ["head"]}, {"head.weight", "head.bias"}),
        ({"use_dora": True, "target_modules": ["lin", "conv"]},
         {"lin.lora_magnitude", "conv.lora_magnitude"}),
    ],
)
def test_adapter_state_dict_has_exactly_the_trained_tensors(kwargs, extra):
    model, _, cfg = make(**kwargs)
    sd = adapter_state_dict(model)
    adapters = {k for k in ADAPTERS if k.split(".")[0] in {n for n in lora_layers(model)}}
    assert set(sd) == adapters | extra
    assert set(sd) == {n for n, p in model.named_parameters() if p.requires_grad}
    full = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(v, full[k]) and not v.requires_grad


def test_adapter_state_dict_needs_lora_layers():
    with pytest.raises(ValueError, match=r"adapter_state_dict: the model has no LoRA layers"):
        adapter_state_dict(Net())


# -- load_adapter_state_dict -------------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True])
def test_load_adapter_state_dict_round_trip(dora):
    model, _, cfg = make(seed=0, dora=dora, bias="lora_only", modules_to_save=["head"])
    randomize_adapters(model, 1, select=is_trainable)
    model.eval()
    y = model(X)
    sd = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    other, _, _ = make(seed=0, dora=dora, bias="lora_only", modules_to_save=["head"])
    other.eval()
    assert not torch.allclose(other(X), y)
    load_adapter_state_dict(other, sd)
    assert_same(other, snapshot(model))
    torch.testing.assert_close(other(X), y, rtol=0, atol=0)
    assert {n for n, p in other.named_parameters() if p.requires_grad} == set(sd)


def _fails_and_leaves_model_unchanged(model, sd, pattern):
    before = snapshot(model)
    with pytest.raises(AdapterLoadError, match=pattern) as info:
        load_adapter_state_dict(model, sd)
    assert_same(model, before)
    return str(info.value)


def _good_sd(seed=5):
    model, _, _ = make(seed=seed, modules_to_save=["head"])
    randomize_adapters(model, seed, select=is_trainable)
    return {k: v.clone() for k, v in adapter_state_dict(model).items()}


def test_load_is_strict_about_missing_keys():
    model, _, _ = make(modules_to_save=["head"])
    sd = _good_sd()
    del sd["conv.lora_B"]
    message = _fails_and_leaves_model_unchanged(
        model, sd, r"missing adapter keys \['conv\.lora_B'\]"
    )
    assert "unexpected" not in message


def test_load_is_strict_about_unexpected_keys():
    model, _, _ = make(modules_to_save=["head"])
    sd = _good_sd()
    sd["other.lora_A"] = torch.zeros(2, 8)
    sd["lin.weight"] = torch.zeros(8, 8)  # a frozen base weight is unexpected too
    message = _fails_and_leaves_model_unchanged(
        model, sd, r"unexpected keys \['lin\.weight', 'other\.lora_A'\]"
    )
    assert "missing" not in message


def test_load_is_strict_about_shapes():
    model, _, _ = make(modules_to_save=["head"])
    sd = _good_sd()
    sd["lin.lora_A"] = torch.zeros(3, 8)  # an adapter of rank 3, not 2
    _fails_and_leaves_model_unchanged(
        model, sd, r"shape mismatch for 'lin\.lora_A': checkpoint has \(3, 8\), model has \(2, 8\)"
    )


def test_load_reports_every_problem_at_once():
    model, _, _ = make(modules_to_save=["head"])
    sd = _good_sd()
    del sd["head.bias"]
    sd["bogus"] = torch.zeros(1)
    sd["emb.lora_B"] = torch.zeros(8, 4)
    sd["conv.lora_A"] = [1, 2]
    message = _fails_and_leaves_model_unchanged(model, sd, r"missing adapter keys \['head.bias'\]")
    assert "unexpected keys ['bogus']" in message
    assert "shape mismatch for 'emb.lora_B': checkpoint has (8, 4), model has (8, 2)" in message
    assert "'conv.lora_A' is a list, not a tensor" in message


def test_load_after_a_failure_still_works():
    model, _, _ = make(modules_to_save=["head"])
    sd = _good_sd()
    bad = dict(sd)
    bad["lin.lora_B"] = torch.zeros(8, 5)
    with pytest.raises(AdapterLoadError):
        load_adapter_state_dict(model, bad)
    load_adapter_state_dict(model, sd)
    assert torch.equal(model.lin.lora_B, sd["lin.lora_B"])


def test_load_errors_on_wrong_input():
    model, _, _ = make()
    with pytest.raises(TypeError, match="expected a mapping of tensors, got list"):
        load_adapter_state_dict(model, [])
    with pytest.raises(AdapterLoadError, match="the model has no LoRA layers"):
        load_adapter_state_dict(Net().requires_grad_(False), {})


@pytest.mark.parametrize("dora", [False, True])
def test_load_into_merged_model_keeps_it_merged_and_correct(dora):
    model, _, _ = make(seed=0, dora=dora, bias="lora_only")
    randomize_adapters(model, 1, select=is_trainable)
    model.eval()
    merge_lora(model)
    source, _, _ = make(seed=0, dora=dora, bias="lora_only")
    randomize_adapters(source, 2, select=is_trainable)
    source.eval()
    expected = source(X)
    sd = {k: v.clone() for k, v in adapter_state_dict(source).items()}
    load_adapter_state_dict(model, sd)
    assert all(m.merged for m in lora_layers(model).values())
    assert_close_fp32(model(X), expected)
    for k in sd:
        assert torch.equal(model.state_dict()[k], sd[k]), k
    unmerge_lora(model)  # the base weights under the merge are still the original ones
    for name in ("lin", "conv"):
        assert_close_fp32(getattr(model, name).weight, getattr(source, name).weight)
    assert_close_fp32(model(X), expected)


# -- key reconciliation for base checkpoints ---------------------------------------------
@pytest.mark.parametrize("dora", [False, True])
def test_base_state_dict_loads_strictly(dora):
    model, base, _ = make(seed=0, dora=dora)
    randomize_adapters(model, 1, select=is_trainable)
    adapters_before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    trained_base = copy.deepcopy(base)
    with torch.no_grad():
        for p in trained_base.parameters():
            p.add_(1.0)
    base_sd = trained_base.state_dict()
    assert not any("lora" in k for k in base_sd)
    result = model.load_state_dict(base_sd, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for k, v in base_sd.items():
        assert torch.equal(model.state_dict()[k], v), k
    for k, v in adapters_before.items():  # the adapters were not touched
        assert torch.equal(model.state_dict()[k], v), k


def test_base_state_dict_loads_under_a_prefix():
    model, base, _ = make()
    outer, outer_base = nn.Sequential(model), nn.Sequential(base)
    result = outer.load_state_dict(outer_base.state_dict(), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []


def test_base_state_dict_missing_a_base_weight_still_fails():
    model, base, _ = make()
    sd = {k: v for k, v in base.state_dict().items() if k != "lin.weight"}
    missing = r'Missing key\(s\) in state_dict: "lin\.weight"\.'
    with pytest.raises(RuntimeError, match=missing) as info:
        model.load_state_dict(sd, strict=True)
    assert "lora" not in str(info.value)  # only the genuinely missing key is reported


@pytest.mark.parametrize("dropped", ["lin.weight", "lin.bias", "conv.weight", "emb.weight",
                                     "other.weight", "norm.bias"])
def test_only_adapter_keys_are_removed_from_missing_keys(dropped):
    """Non-strict loading shows what strict loading checks: the missing list keeps every base
    key; only each layer's own adapter keys are removed from it, not the whole list."""
    model, base, _ = make()
    sd = {k: v for k, v in base.state_dict().items() if k != dropped}
    result = model.load_state_dict(sd, strict=False)
    assert result.missing_keys == [dropped]
    assert result.unexpected_keys == []


def test_full_lora_state_dict_loads_strictly():
    model, _, _ = make()
    source, _, _ = make(seed=3)
    randomize_adapters(source, 3, select=is_trainable)
    result = model.load_state_dict(source.state_dict(), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_same(model, snapshot(source))


def test_unexpected_extra_key_still_fails():
    model, base, _ = make()
    sd = dict(base.state_dict())
    sd["lin.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "lin\.extra"'):
        model.load_state_dict(sd, strict=True)
    result = model.load_state_dict(sd, strict=False)
    assert result.unexpected_keys == ["lin.extra"] and result.missing_keys == []


def test_reconciliation_state_does_not_leak_between_loads():
    model, base, _ = make()
    model.load_state_dict(base.state_dict(), strict=True)  # records the absent adapter keys
    sd = {k: v for k, v in model.state_dict().items() if k != "lin.lora_A"}
    # lin.lora_A is absent again; then a complete load reports nothing missing.
    model.load_state_dict(sd, strict=True)
    result = model.load_state_dict(model.state_dict(), strict=True)
    assert result.missing_keys == []
    sd = {k: v for k, v in base.state_dict().items() if k != "conv.weight"}
    assert model.load_state_dict(sd, strict=False).missing_keys == ["conv.weight"]


# -- base_fingerprint --------------------------------------------------------------------
def test_base_fingerprint_tracks_base_weights_only():
    model, _, _ = make(bias="lora_only", modules_to_save=["head"])
    fp = base_fingerprint(model)
    assert set(fp) == {"tensors", "sha256"}
    # Frozen base parameters: emb/lin/conv/other weights, other.bias, norm weight+bias.
    assert fp["tensors"] == 7
    assert base_fingerprint(model) == fp
    # adapters, trainable biases and the saved head change
    randomize_adapters(model, 1, select=is_trainable)
    assert base_fingerprint(model) == fp
    with torch.no_grad():
        model.lin.weight[0, 0] += 0.5
    changed = base_fingerprint(model)
    assert changed != fp and changed["tensors"] == 7
    with torch.no_grad():
        model.lin.weight[0, 0] -= 0.5
    assert base_fingerprint(model) == fp


@pytest.mark.parametrize("name", ["emb.weight", "conv.weight", "other.weight", "other.bias",
                                  "norm.weight"])
def test_base_fingerprint_sees_every_base_parameter(name):
    model, _, _ = make()
    fp = base_fingerprint(model)
    with torch.no_grad():
        model.get_parameter(name).view(-1)[-1] += 1.0
    assert base_fingerprint(model) != fp


def test_base_fingerprint_sees_a_changed_shape():
    """Same values (an extra all-zero output row), different shape: a different print."""
    model, _, _ = make()
    other, _, _ = make()
    other.head = nn.Linear(8, 4).requires_grad_(False)
    with torch.no_grad():
        other.head.weight.zero_()
        other.head.bias.zero_()
        other.head.weight[:3].copy_(model.head.weight)
        other.head.bias[:3].copy_(model.head.bias)
    assert base_fingerprint(other) != base_fingerprint(model)
    assert re.fullmatch(r"[0-9a-f]{64}", base_fingerprint(model)["sha256"])
