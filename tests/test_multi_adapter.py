"""Many adapters on one base (issue 10): named adapters, switching, deleting, per-sample
adapters in one batch, merging several, heads per adapter, files both ways."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from _helpers import assert_close_fp32, randomize_adapters
from torch import nn

from lora_lightning import (
    AdapterLoadError,
    AdapterNameError,
    LoRAConfig,
    active_adapters,
    adapter_state_dict,
    combine_adapters,
    delete_adapter,
    inject_lora,
    list_adapters,
    load_adapter,
    load_adapters,
    lora_layers,
    merge_lora,
    per_sample_adapters,
    save_adapter,
    save_adapters,
    set_adapter,
    unmerge_lora,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.classifier = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)                                   # (B, T, 8)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)        # (B, T, 8)
        h = self.fc2(torch.relu(self.fc1(h)))
        return self.classifier(h.mean(1))


A = LoRAConfig(r=2, alpha=4, target_modules=["fc1", "fc2", "conv", "emb"],
               modules_to_save=["classifier"])
B = LoRAConfig(r=3, alpha=3, target_modules=["fc1"], use_dora=True, dropout=0.0,
               modules_to_save=["classifier"])
X = torch.randint(0, 20, (6, 5), generator=torch.Generator().manual_seed(1))


def two_adapters() -> nn.Module:
    model = Net()
    inject_lora(model, A, adapter="a")
    randomize_adapters(model, 1, adapter="a")
    inject_lora(model, B, adapter="b")
    randomize_adapters(model, 2, adapter="b")
    return model


def alone(config: LoRAConfig, seed: int, donor: nn.Module, adapter: str) -> nn.Module:
    """A fresh model with only ``adapter``'s values from ``donor`` (as 'default')."""
    model = Net()
    inject_lora(model, config)
    state = adapter_state_dict(donor, adapter)
    fixed = {re.sub(rf"\.(lora_[A-Za-z]+)_{adapter}$", r".\1", k): v for k, v in state.items()}
    model.load_state_dict(fixed, strict=False)
    return model


def test_a_single_default_adapter_keeps_todays_keys():
    model = Net()
    inject_lora(model, A)
    keys = set(model.state_dict())
    assert {"fc1.lora_A", "fc1.lora_B", "emb.lora_A", "conv.lora_B"} <= keys
    assert not any("_default" in k for k in keys)
    assert list_adapters(model) == ["default"] and active_adapters(model) == ["default"]


def test_second_adapter_has_its_own_settings_and_only_it_trains():
    model = two_adapters()
    fc1 = model.fc1
    assert set(fc1.lora_specs) == {"a", "b"}
    assert (fc1.lora_specs["a"].r, fc1.lora_specs["b"].r) == (2, 3)
    assert fc1.lora_specs["b"].use_dora and not fc1.lora_specs["a"].use_dora
    assert "b" not in model.fc2.lora_specs  # b targets fc1 only
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc1.lora_A_b", "fc1.lora_B_b", "fc1.lora_magnitude_b",
                         "classifier.weight", "classifier.bias"}
    assert active_adapters(model) == ["b"]


def test_each_adapter_alone_equals_a_model_that_holds_only_it():
    model = two_adapters()
    for name, config, seed in (("a", A, 1), ("b", B, 2)):
        set_adapter(model, name)
        ref = alone(config, seed, model, name)
        assert_close_fp32(model(X), ref(X))


def test_switching_copies_no_weight_and_unknown_names_change_nothing():
    model = two_adapters()
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    set_adapter(model, "a")
    ya = model(X)
    set_adapter(model, "b")
    assert not torch.allclose(model(X), ya)
    set_adapter(model, "a")
    torch.testing.assert_close(model(X), ya, rtol=0, atol=0)
    after = {k: v.data_ptr() for k, v in model.state_dict().items()}
    assert {k: before[k] for k in after if not k.startswith("classifier")} == {
        k: after[k] for k in after if not k.startswith("classifier")}
    with pytest.raises(AdapterNameError, match=r"'c'.*holds adapters \['a', 'b'\]") as info:
        set_adapter(model, ["a", "c"])
    assert info.value.existing == ["a", "b"]
    assert active_adapters(model) == ["a"]
    assert all(m.lora_active == (["a"] if "a" in m.lora_specs else [])
               for m in lora_layers(model).values())


def test_two_active_adapters_add_up_and_merge_unmerge_exactly():
    model = Net()
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["fc1", "fc2"]), adapter="a")
    randomize_adapters(model, 1, adapter="a")
    inject_lora(model, LoRAConfig(r=4, alpha=2, target_modules=["fc1", "conv"]), adapter="b")
    randomize_adapters(model, 2, adapter="b")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    set_adapter(model, ["a", "b"])
    y = model(X)
    # the sum of the two updates, computed from the weights directly
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer in lora_layers(ref).values():
            delta = layer._update(layer.lora_active)
            layer.out_first(layer.weight).add_(delta)
            layer.lora_active = []
    assert_close_fp32(y, ref(X))
    assert merge_lora(model) == 3
    assert model.fc1.merged_adapters == ["a", "b"]
    assert_close_fp32(model(X), y)
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        assert_close_fp32(v, base[k], msg=k)  # W + ΔW - ΔW: W up to rounding


def test_dora_adapters_merge_only_alone():
    model = Net()
    inject_lora(model, LoRAConfig(r=2, target_modules=["fc1"]), adapter="a")
    inject_lora(model, LoRAConfig(r=2, target_modules=["fc1"], use_dora=True), adapter="b")
    set_adapter(model, ["a", "b"])
    with pytest.raises(RuntimeError, match="DoRA adapters merge only alone"):
        merge_lora(model)


def test_switching_while_merged_is_refused():
    model = two_adapters()
    set_adapter(model, "a")
    merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        set_adapter(model, "b")
    assert active_adapters(model) == ["a"]


def test_two_adapters_with_their_own_head_cannot_be_active_together():
    model = two_adapters()
    with pytest.raises(AdapterNameError, match=r"each have their own 'classifier'"):
        set_adapter(model, ["a", "b"])
    assert active_adapters(model) == ["b"]


def test_heads_belong_to_their_adapter():
    model = two_adapters()
    set_adapter(model, "a")
    head_a = model.classifier
    set_adapter(model, "b")
    head_b = model.classifier
    assert head_a is not head_b
    assert not torch.equal(head_a.weight, head_b.weight)
    set_adapter(model, "a")
    assert model.classifier is head_a


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad-folded", "autograd"])
def test_per_sample_adapters_equal_each_adapter_alone_and_base_samples_equal_the_base(grad):
    model = two_adapters()
    names = ["a", "b", None, "b", "a", None]
    outs = {}
    for name in ("a", "b"):
        set_adapter(model, name)
        outs[name] = model(X)
    plain = Net()
    outs[None] = plain(X)
    set_adapter(model, "a")
    with torch.set_grad_enabled(grad), per_sample_adapters(model, names):
        mixed = model(X)
    for i, name in enumerate(names):
        assert_close_fp32(mixed[i], outs[name][i], msg=f"sample {i} ({name})")
    # Base-only samples get the base output, but not bit for bit: the mixed batch runs the
    # base op and the heads on other batch shapes (index_select), so other kernel blocking.
    for i in (2, 5):
        assert_close_fp32(mixed[i], outs[None][i])
    assert model.fc1.lora_groups is None and active_adapters(model) == ["a"]


def test_delete_adapter_restores_plain_layers_when_none_is_left():
    model = two_adapters()
    delete_adapter(model, "b")
    assert list_adapters(model) == ["a"] and "b" not in model.fc1.lora_specs
    assert "fc1.lora_A_b" not in model.state_dict()
    delete_adapter(model, "a")
    assert not lora_layers(model) and list_adapters(model) == []
    assert type(model.fc1) is nn.Linear
    torch.testing.assert_close(model(X), Net()(X))
    with pytest.raises(AdapterNameError, match=r"holds adapters \[\]"):
        delete_adapter(model, "a")


def test_adding_a_name_that_exists_with_another_config_is_refused():
    model = two_adapters()
    with pytest.raises(ValueError, match=r"adapter 'a'"):
        inject_lora(model, LoRAConfig(r=8, target_modules=["fc1"]), adapter="a")
    with pytest.raises(ValueError, match=r"adapter\.name: got 'no.dots'"):
        inject_lora(model, A, adapter="no.dots")


def test_files_per_adapter_and_the_multi_adapter_layout_round_trip(tmp_path):
    model = two_adapters()
    save_adapter(model, tmp_path / "b", adapter="b")
    data = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert data["r"] == 3 and data["use_dora"] is True
    save_adapters(model, tmp_path / "all")
    assert (tmp_path / "all" / "a" / "adapter_config.json").is_file()
    fresh = Net()
    assert load_adapters(fresh, tmp_path / "all") == ["a", "b"]
    assert active_adapters(fresh) == ["a"]  # loading adds; the first loaded stays active
    for name in ("a", "b"):
        set_adapter(model, name)
        set_adapter(fresh, name)
        torch.testing.assert_close(fresh(X), model(X), rtol=1e-6, atol=1e-6)


def test_loading_an_adapter_that_does_not_fit_leaves_the_model_unchanged(tmp_path):
    model = two_adapters()
    other = Net()
    other.fc1 = nn.Linear(8, 16)
    inject_lora(other, LoRAConfig(r=2, target_modules=["fc1"]))
    save_adapter(other, tmp_path / "ok")
    # the file's fc1.lora_B for another output size
    bad = tmp_path / "bad"
    wide = nn.Module()
    wide.fc1 = nn.Linear(8, 24)
    inject_lora(wide, LoRAConfig(r=2, target_modules=["fc1"]))
    save_adapter(wide, bad)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterLoadError, match=r"fc1\.lora_B_c"):
        load_adapter(model, bad, adapter="c")
    assert list_adapters(model) == ["a", "b"] and active_adapters(model) == ["b"]
    assert set(model.state_dict()) == set(state)
    load_adapter(model, tmp_path / "ok", adapter="c")
    assert list_adapters(model) == ["a", "b", "c"] and active_adapters(model) == ["b"]


# -- combinations ---------------------------------------------------------------------------
def _plain_pair():
    model = Net()
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["fc1", "fc2", "conv", "emb"]),
                adapter="a")
    randomize_adapters(model, 1, adapter="a")
    inject_lora(model, LoRAConfig(r=3, alpha=6, target_modules=["fc1", "conv"]), adapter="b")
    randomize_adapters(model, 2, adapter="b")
    return model


def _updates(model, names):
    return {n: m._update([a for a in names if a in m.lora_specs]) if any(
        a in m.lora_specs for a in names) else None for n, m in lora_layers(model).items()}


@pytest.mark.parametrize("how", ["cat", "svd"])
def test_cat_and_full_rank_svd_are_the_weighted_sum_of_the_updates(how):
    model = _plain_pair()
    weights = (0.7, -1.5)
    combine_adapters(model, ["a", "b"], weights, "mix", combination=how, r=5)
    for name, layer in lora_layers(model).items():
        want = sum(w * layer._update([a]) for a, w in zip(("a", "b"), weights, strict=True)
                   if a in layer.lora_specs)
        torch.testing.assert_close(layer._update(["mix"]), want, rtol=1e-4, atol=1e-5, msg=name)
    # and the forward agrees with running both with those weights folded in
    set_adapter(model, "mix")
    y = model(X)
    merge_lora(model)
    assert_close_fp32(model(X), y)


def test_low_rank_svd_is_the_best_approximation_and_linear_mixes_factors():
    model = _plain_pair()
    combine_adapters(model, ["a", "b"], (1.0, 1.0), "low", combination="svd", r=1)
    layer = model.fc1
    full = layer._update(["a"]) + layer._update(["b"])
    s = torch.linalg.svdvals(full)
    err = torch.linalg.matrix_norm(layer._update(["low"]) - full)
    torch.testing.assert_close(err, s[1:].norm(), rtol=1e-4, atol=1e-5)  # Eckart-Young
    with pytest.raises(ValueError, match="equal ranks"):
        combine_adapters(model, ["a", "b"], (1.0, 1.0), "lin", combination="linear")
    assert "lin" not in list_adapters(model)
    combine_adapters(model, ["a"], (4.0,), "lin", combination="linear")
    torch.testing.assert_close(model.fc2._update(["lin"]), 4.0 * model.fc2._update(["a"]),
                               rtol=1e-5, atol=1e-6)


def test_a_combined_adapter_trains_saves_and_loads(tmp_path):
    model = _plain_pair()
    config = combine_adapters(model, ["a", "b"], (0.5, 0.5), "mix")
    inject_lora(model, config, adapter="mix")  # keeps the values; now active and trainable
    assert active_adapters(model) == ["mix"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{m}.{p}_mix" for m in ("fc1", "fc2", "conv", "emb") for p in ("lora_A", "lora_B")}
    y = model(X)
    save_adapter(model, tmp_path / "mix", adapter="mix")
    fresh = Net()
    load_adapter(fresh, tmp_path / "mix")
    torch.testing.assert_close(fresh(X), y, rtol=1e-5, atol=1e-6)


# -- PEFT, both ways, with several adapters --------------------------------------------------
def test_peft_multi_adapter_files_load_here_and_ours_load_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    configs = {"default": peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"],
                                          modules_to_save=["classifier"]),
               "other": peft.LoraConfig(r=3, lora_alpha=3, target_modules=["fc1"],
                                        modules_to_save=["classifier"])}
    pm = peft.get_peft_model(Net(), configs["default"])
    pm.add_adapter("other", configs["other"])
    randomize_adapters(pm, 3, select=lambda n, p: "lora_" in n or "modules_to_save" in n)
    pm.save_pretrained(str(tmp_path / "peft"))
    assert (tmp_path / "peft" / "other" / "adapter_config.json").is_file()
    ours = Net()
    assert load_adapters(ours, tmp_path / "peft") == ["default", "other"]
    with torch.no_grad():
        for name in ("default", "other"):
            pm.set_adapter(name)
            set_adapter(ours, name)
            assert_close_fp32(ours(X), pm(X), msg=name)
    # and back: what we save loads in PEFT under each adapter's name
    save_adapters(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(Net(), str(tmp_path / "ours"))
    back.load_adapter(str(tmp_path / "ours" / "other"), adapter_name="other")
    with torch.no_grad():
        for name in ("default", "other"):
            back.set_adapter(name)
            set_adapter(ours, name)
            assert_close_fp32(back(X), ours(X), msg=name)


def test_loading_into_a_name_that_exists_needs_replace(tmp_path):
    model = two_adapters()
    save_adapter(model, tmp_path / "a", adapter="a")
    set_adapter(model, "a")
    y = model(X)
    with pytest.raises(AdapterNameError, match=r"already holds adapter 'a'; pass replace=True"):
        load_adapter(model, tmp_path / "a", adapter="a")
    with torch.no_grad():
        model.fc1.lora_B_a.zero_()
    load_adapter(model, tmp_path / "a", adapter="a", replace=True)
    torch.testing.assert_close(model(X), y, rtol=0, atol=0)


def test_an_adapter_injected_into_a_wrapper_saves_from_the_inner_model(tmp_path):
    """A LightningModule holding an HF model: LoRA is injected into the wrapper, and the
    inner model's adapter is saved relative to the inner model (what PEFT loads on it)."""
    wrapper = nn.Module()
    wrapper.net = Net()
    inject_lora(wrapper, LoRAConfig(r=2, target_modules=["fc1", "fc2"]))
    randomize_adapters(wrapper.net, 4, std=1.0)
    save_adapter(wrapper.net, tmp_path / "inner")
    data = json.loads((tmp_path / "inner" / "adapter_config.json").read_text())
    assert data["target_modules"] == "fc1|fc2"
    fresh = load_adapter(Net(), tmp_path / "inner")
    torch.testing.assert_close(fresh(X), wrapper.net(X), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["mixed", "all_none", "disabled"])
def test_samples_without_an_adapter_get_the_base_model_heads_included(case):
    """Issue 22: a sample marked None got the base head only when another sample named an
    adapter; in an all-None batch, and under disable_adapters, it got the trained head."""
    from lora_lightning import disable_adapters

    model = Net()
    inject_lora(model, LoRAConfig(r=2, target_modules=["fc1"], modules_to_save=["classifier"]))
    randomize_adapters(model, 1)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)  # the head trained with the adapter
    trained_head = model.classifier
    base = Net()(X).detach()
    adapted = model(X).detach()
    names = {"mixed": ["default", None, "default", None, None, "default"],
             "all_none": [None] * len(X), "disabled": [None] * len(X)}[case]
    if case == "disabled":
        with torch.no_grad(), disable_adapters(model):
            out = model(X)
    else:
        with torch.no_grad(), per_sample_adapters(model, names):
            out = model(X)
    for i, name in enumerate(names):
        want = base[i] if name is None else adapted[i]
        assert_close_fp32(out[i], want)
        if name is None:
            assert not torch.allclose(out[i], adapted[i], atol=1e-3), i  # not the trained head
    assert model.classifier is trained_head  # put back after the block
    assert_close_fp32(model(X), adapted)


def test_a_mixed_batch_of_ranks_trains_each_adapter_on_its_own_samples():
    """The batched path (adapters stacked, ranks padded) gives each adapter the gradient of
    its own samples only, as running each sub-batch alone with that adapter does."""
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        inject_lora(model, LoRAConfig(r=2, target_modules=["0", "2"]), adapter="a")
        inject_lora(model, LoRAConfig(r=3, alpha=6, target_modules=["0", "2"]), adapter="b")
        randomize_adapters(model, 4)
        for p in model.parameters():
            p.requires_grad_("lora_" in next(n for n, q in model.named_parameters() if q is p))
        return model

    x = torch.randn(5, 4, 6, generator=torch.Generator().manual_seed(5))
    names = ["a", "b", None, "b", "a"]
    mixed = build()
    with per_sample_adapters(mixed, names):
        mixed(x).square().sum().backward()
    alone = build()
    for adapter in ("a", "b"):
        rows = [i for i, n in enumerate(names) if n == adapter]
        set_adapter(alone, adapter)
        alone(x[rows]).square().sum().backward()
    for (name, p), q in zip(mixed.named_parameters(), alone.parameters(), strict=True):
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            assert_close_fp32(p.grad, q.grad)
