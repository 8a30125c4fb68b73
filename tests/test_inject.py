"""Tests for target matching (every entry must match, all-linear), injection, freezing and
parameter counting."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from _helpers import assert_close_fp32, randomize_adapters
from torch import nn

from lora_lightning import (
    LoRAConfig,
    LoRALayer,
    ParamCount,
    count_parameters,
    inject_lora,
    lora_layers,
    merge_lora,
)

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(8, 8)
        self.key = nn.Linear(8, 8, bias=False)
        self.value = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, h):
        return self.norm(h + self.query(h) + self.key(h) + self.value(h))


class Net(nn.Module):
    """Embedding, two blocks, a Conv1d, an HF Conv1D, a classifier and an lm_head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList([Block(), Block()])
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.proj = Conv1D(8, 8)
        self.classifier = nn.Linear(8, 3)
        self.lm_head = nn.Linear(8, 10)

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.layers:
            h = block(h)
        h = self.proj(self.conv(h.transpose(1, 2)).transpose(1, 2))
        return self.classifier(h).sum(-1) + self.lm_head(h).sum(-1)


def adapted(model: nn.Module) -> set[str]:
    return set(lora_layers(model))


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


QKV = {f"layers.{i}.{n}" for i in (0, 1) for n in ("query", "key", "value")}


# -- target matching ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (["query"], {"layers.0.query", "layers.1.query"}),  # list: dotted suffix
        (["layers.0.query"], {"layers.0.query"}),  # list: exact full name
        (["0.query", "value"], {"layers.0.query", "layers.0.value", "layers.1.value"}),
        (["proj", "conv", "embed"], {"proj", "conv", "embed"}),
        (r"layers\.0\.(query|value)", {"layers.0.query", "layers.0.value"}),  # full regex
        (r".*query", {"layers.0.query", "layers.1.query"}),
        (r"layers\.\d\.(query|key|value)", QKV),
        ("all-linear", QKV | {"proj"}),  # no head, no Embedding/Conv1d
    ],
)
def test_target_matching(targets, expected):
    model = Net()
    report = inject_lora(model, LoRAConfig(r=2, target_modules=targets))
    assert adapted(model) == expected
    assert sorted(report.injected) == sorted(expected)
    assert report.targets == sorted(expected)
    assert report.already_injected == []


@pytest.mark.parametrize(
    "targets",
    [
        ["uery"],  # a list entry is not a substring
        ["layers.query"],  # nor a non-contiguous suffix
        "query",  # a string must match the full name
        r"layers\.0\.quer",  # fullmatch, not match/search
    ],
)
def test_target_matching_is_not_substring(targets):
    with pytest.raises(ValueError, match=r"LoRAConfig\.target_modules: got .*matches no module"):
        inject_lora(Net(), LoRAConfig(target_modules=targets))


@pytest.mark.parametrize("head", ["classifier", "lm_head", "score"])
def test_all_linear_skips_output_heads(head):
    model = nn.Module()
    model.body = nn.Linear(4, 4)
    model.add_module(head, nn.Linear(4, 2))
    inject_lora(model, LoRAConfig(target_modules="all-linear"))
    assert adapted(model) == {"body"}


def test_all_linear_skips_get_output_embeddings_and_modules_to_save():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.out = nn.Linear(4, 7)
            self.extra = nn.Linear(4, 4)

        def get_output_embeddings(self):
            return self.out

    model = LM()
    inject_lora(model, LoRAConfig(target_modules="all-linear", modules_to_save=["extra"]))
    assert adapted(model) == {"body"}
    assert trainable(model) == {"body.lora_A", "body.lora_B", "extra.weight", "extra.bias"}


@pytest.mark.parametrize(
    ("exclude", "expected"),
    [
        (["layers.1.query"], QKV - {"layers.1.query"}),
        (["key"], QKV - {"layers.0.key", "layers.1.key"}),
        (r"layers\.0\..*", {"layers.1.query", "layers.1.key", "layers.1.value"}),
    ],
)
def test_exclude_modules(exclude, expected):
    model = Net()
    inject_lora(model, LoRAConfig(target_modules=["query", "key", "value"],
                                  exclude_modules=exclude))
    assert adapted(model) == expected


def test_modules_to_save_are_never_adapted():
    model = Net()
    inject_lora(model, LoRAConfig(target_modules=["query", "classifier"],
                                  modules_to_save=["classifier"]))
    assert adapted(model) == {"layers.0.query", "layers.1.query"}


def test_rank_and_alpha_patterns():
    model = Net()
    cfg = LoRAConfig(r=4, alpha=8, target_modules=["query", "value", "proj"],
                     rank_pattern={r"layers\.1\.query": 2, "value": 6},
                     alpha_pattern={"proj": 3.0})
    report = inject_lora(model, cfg)
    layers = lora_layers(model)
    expected = {
        "layers.0.query": (4, 8.0), "layers.1.query": (2, 8.0),
        "layers.0.value": (6, 8.0), "layers.1.value": (6, 8.0), "proj": (4, 3.0),
    }
    assert {n: (m.r, m.alpha) for n, m in layers.items()} == expected
    assert report.ranks == {n: r for n, (r, _) in expected.items()}
    for name, (r, alpha) in expected.items():
        m = layers[name]
        assert m.lora_A.shape == (r, 8) and m.lora_B.shape == (8, r)
        assert m.scaling == pytest.approx(alpha / r)


def test_report_by_type_and_params():
    model = Net()
    report = inject_lora(model, LoRAConfig(r=2, target_modules=["query", "conv", "proj",
                                                                 "embed"]))
    assert report.by_type == {"Linear": 2, "Conv1d": 1, "Conv1D": 1, "Embedding": 1}
    assert report.params == count_parameters(model)
    assert report.params.trainable == sum(
        p.numel() for n, p in model.named_parameters() if "lora_" in n
    )


# -- freezing ----------------------------------------------------------------------------
ADAPTERS = {f"{n}.lora_{ab}" for n in ("layers.0.query", "layers.1.query", "proj")
            for ab in "AB"}
ALL_BIASES = {n for n, _ in Net().named_parameters() if n.endswith(".bias")}


@pytest.mark.parametrize(
    ("bias", "expected"),
    [
        ("none", ADAPTERS),
        ("lora_only", ADAPTERS | {"layers.0.query.bias", "layers.1.query.bias", "proj.bias"}),
        ("all", ADAPTERS | ALL_BIASES),
    ],
)
@pytest.mark.parametrize("save", [False, True])
def test_freezing(bias, expected, save):
    model = Net()
    cfg = LoRAConfig(r=2, target_modules=["query", "proj"], bias=bias,
                     modules_to_save=["classifier"] if save else None)
    report = inject_lora(model, cfg)
    if save:
        expected = expected | {"classifier.weight", "classifier.bias"}
    assert trainable(model) == expected
    assert report.params.trainable == sum(
        p.numel() for n, p in model.named_parameters() if n in expected
    )


def test_unmatched_modules_to_save_leaves_model_untouched():
    model = Net()
    model.lm_head.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"LoRAConfig\.modules_to_save: got \['nope'\]"):
        inject_lora(model, LoRAConfig(target_modules=["query"], modules_to_save=["nope"]))
    assert adapted(model) == set()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert "_lora_config" not in model.__dict__
    inject_lora(model, LoRAConfig(target_modules=["query"]))  # still injectable afterwards
    assert adapted(model) == {"layers.0.query", "layers.1.query"}


# -- count_parameters --------------------------------------------------------------------
def test_count_parameters_is_a_named_tuple():
    count = count_parameters(nn.Linear(3, 2))
    assert isinstance(count, ParamCount) and isinstance(count, tuple)
    assert count == (8, 8, 1.0)
    assert (count.trainable, count.total, count.ratio) == (8, 8, 1.0)
    assert count_parameters(nn.ReLU()) == ParamCount(0, 0, 0.0)


def test_count_parameters_counts_shared_parameters_once():
    model = nn.Module()
    model.embed = nn.Embedding(10, 4)
    model.head = nn.Linear(4, 10, bias=False)
    model.head.weight = model.embed.weight  # tied
    model.also = model.head  # the same module twice
    model.body = nn.Linear(4, 4)
    assert count_parameters(model) == ParamCount(60, 60, 1.0)
    model.body.requires_grad_(False)
    assert count_parameters(model) == ParamCount(40, 60, 40 / 60)


def test_count_parameters_after_injection_with_tied_weights():
    model = nn.Module()
    model.embed = nn.Embedding(10, 4)
    model.lm_head = nn.Linear(4, 10, bias=False)
    model.lm_head.weight = model.embed.weight
    model.body = nn.Linear(4, 4)
    inject_lora(model, LoRAConfig(r=2, target_modules=["body"]))
    # 40 (tied, once) + 20 (body) + 2*(2*4) adapters
    assert count_parameters(model) == ParamCount(16, 76, 16 / 76)


# -- idempotence -------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [["query", "proj"], r".*\.query|proj", "all-linear"])
def test_second_injection_changes_nothing(targets):
    model = Net()
    cfg = LoRAConfig(r=2, target_modules=targets, bias="lora_only",
                     modules_to_save=["classifier"])
    first = inject_lora(model, cfg)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.add_(1.0)
            layer.lora_A.mul_(2.0)
    params = dict(model.named_parameters())
    values = {n: p.detach().clone() for n, p in params.items()}
    flags = {n: p.requires_grad for n, p in params.items()}
    classes = {n: type(m) for n, m in model.named_modules()}
    again = inject_lora(model, LoRAConfig(**cfg.to_dict()))  # equal, not the same object
    assert again.injected == []
    assert sorted(again.already_injected) == sorted(first.injected)
    assert again.ranks == first.ranks and again.by_type == first.by_type
    assert again.params == first.params
    now = dict(model.named_parameters())
    assert list(now) == list(params)
    for name, p in now.items():
        assert p is params[name], name
        assert torch.equal(p, values[name]), name  # adapters were NOT reset
        assert p.requires_grad == flags[name], name
    assert {n: type(m) for n, m in model.named_modules()} == classes


def test_reinjection_with_different_config_is_an_error():
    model = Net()
    inject_lora(model, LoRAConfig(r=2, target_modules=["query"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"already injected with a different config.*"
                                         r"unload_lora"):
        inject_lora(model, LoRAConfig(r=4, target_modules=["query"]))
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    assert all(torch.equal(after[n], v) for n, v in before.items())
    assert lora_layers(model)["layers.0.query"].r == 2


@pytest.mark.parametrize(
    ("kwargs", "detail"),
    [
        ({"r": 4}, r"the config asks for r=4, alpha=16, dora=False"),
        ({"alpha": 3}, r"the config asks for r=2, alpha=3, dora=False"),
        ({"use_dora": True}, r"the config asks for r=2, alpha=16, dora=True"),
    ],
)
def test_module_already_adapted_with_other_settings_is_an_error(kwargs, detail):
    model = Net()
    inject_lora(model.layers[0], LoRAConfig(r=2, target_modules=["query"]))  # a submodule
    cfg = LoRAConfig(**{"r": 2, "target_modules": ["query"], **kwargs})
    with pytest.raises(ValueError, match=rf"module 'layers\.0\.query' already has an adapter "
                                         rf"with r=2, alpha=16, dora=False; {detail}\. "
                                         r"Call unload_lora\(model\) first"):
        inject_lora(model, cfg)
    assert adapted(model) == {"layers.0.query"}  # layers.1.query was not half-done


# -- every config entry must match something -------------------------------------------
class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(8, 8)
        self.key = nn.Linear(8, 8)
        self.value = nn.Linear(8, 8)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList([SelfAttention(), SelfAttention()])
        self.classifier = nn.Linear(8, 2)


TYPO_CASES = {
    "target_modules": (dict(target_modules=["quary", "value"]), "quary", "query"),
    "modules_to_save": (dict(target_modules=["query"], modules_to_save=["classifier",
                                                                           "classifer"]),
                        "classifer", "classifier"),
    "exclude_modules": (dict(target_modules=["query", "value"],
                             exclude_modules=["layer.0.value", "kee"]), "kee", "key"),
    "rank_pattern": (dict(target_modules=["query", "value"], rank_pattern={"valeu": 4}),
                     "valeu", "value"),
    "alpha_pattern": (dict(target_modules=["query", "value"], alpha_pattern={"quary": 4.0}),
                      "quary", "query"),
}


@pytest.mark.parametrize("field", list(TYPO_CASES))
def test_an_entry_matching_nothing_is_an_error_naming_it(field):
    kwargs, typo, nearest = TYPO_CASES[field]
    model = Encoder()
    with pytest.raises(ValueError) as err:
        inject_lora(model, LoRAConfig(r=2, **kwargs))
    assert typo in str(err.value) and nearest in str(err.value)
    assert not lora_layers(model)  # resolved before acting: nothing was changed
    assert all(p.requires_grad for p in model.parameters())


def test_the_same_configs_spelled_right_inject():
    """The control for the test above: with the typo fixed each config injects."""
    fixed = {
        "target_modules": dict(target_modules=["query", "value"]),
        "modules_to_save": dict(target_modules=["query"], modules_to_save=["classifier"]),
        "exclude_modules": dict(target_modules=["query", "value"],
                                exclude_modules=["layer.0.value", "key"]),
        "rank_pattern": dict(target_modules=["query", "value"], rank_pattern={"value": 4}),
        "alpha_pattern": dict(target_modules=["query", "value"], alpha_pattern={"query": 4.0}),
    }
    assert set(fixed) == set(TYPO_CASES)
    for kwargs in fixed.values():
        assert lora_layers(inject_lora_fresh(kwargs))


def inject_lora_fresh(kwargs) -> nn.Module:
    model = Encoder()
    inject_lora(model, LoRAConfig(r=2, **kwargs))
    return model


# -- all-linear: classifier heads and Linear subclasses --------------------------------
def roberta_cls():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=64,
                                     max_position_embeddings=40, num_labels=3, pad_token_id=1)
    return transformers.RobertaForSequenceClassification(cfg).eval()


def test_all_linear_leaves_the_whole_classifier_head_alone():
    model = roberta_cls()
    inject_lora(model, LoRAConfig(r=2, target_modules="all-linear"))
    adapted = set(lora_layers(model))
    assert "roberta.encoder.layer.0.attention.self.query" in adapted
    assert not {n for n in adapted if n.startswith("classifier")}


def test_all_linear_report_lists_skipped_heads_with_a_reason():
    """``InjectionReport.skipped``: Skipped(name, kind, reason) entries."""
    model = roberta_cls()
    report = inject_lora(model, LoRAConfig(r=2, target_modules="all-linear"))
    for name in ("classifier.dense", "classifier.out_proj"):
        assert {s.name: s.reason for s in report.skipped}[name]


class MyLinear(nn.Linear):
    """A user subclass that adds nothing to nn.Linear's computation."""


class WithSubclass(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.plain = nn.Linear(8, 8)
        self.custom = MyLinear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.custom(torch.tanh(self.plain(x)))))


def test_all_linear_adapts_a_linear_subclass_or_reports_it_skipped():
    torch.manual_seed(0)
    base = WithSubclass().eval()
    model = copy.deepcopy(base)
    report = inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules="all-linear"))
    assert "plain" in lora_layers(model)
    if "custom" not in lora_layers(model):
        assert report.skipped["custom"]  # skipped, with a reason
        return
    x = torch.randn(3, 8)
    randomize_adapters(model)
    with torch.no_grad():
        y = model(x)
        assert (y - base(x)).abs().max() > 1e-3
        merge_lora(model)
        assert_close_fp32(model(x), y)


# -- errors ------------------------------------------------------------------------------
def test_no_match_lists_at_most_20_candidates_with_types():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(30)], nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match=r"LoRAConfig\.target_modules: got \['nothing'\], "
                                         r"which matches no module") as info:
        inject_lora(model, LoRAConfig(target_modules=["nothing"]))
    message = str(info.value)
    assert len(re.findall(r"'\d+ \(Linear\)'", message)) == 20
    assert "'0 (Linear)'" in message and "'19 (Linear)'" in message
    assert "'20 (Linear)'" not in message
    assert "... and 11 more" in message


def test_no_match_candidates_name_types_and_skip_unsupported():
    with pytest.raises(ValueError, match="candidates") as info:
        inject_lora(Net(), LoRAConfig(target_modules=["nothing"]))
    message = str(info.value)
    for item in ("'embed (Embedding)'", "'layers.0.query (Linear)'", "'conv (Conv1d)'",
                 "'proj (Conv1D)'"):
        assert item in message
    assert "LayerNorm" not in message and "ModuleList" not in message


@pytest.mark.parametrize(
    ("targets", "name", "type_name"),
    [
        (["norm"], "layers.0.norm", "torch.nn.modules.normalization.LayerNorm"),
        (["layers.1"], "layers.1", "Block"),  # a container
        (["layers"], "layers", "torch.nn.modules.container.ModuleList"),
    ],
)
def test_unsupported_type_names_module_and_type(targets, name, type_name):
    model = Net()
    with pytest.raises(TypeError, match=rf"target module '{re.escape(name)}' has type "
                                        rf"\S*{re.escape(type_name)}, which LoRA does not "
                                        r"support; supported types are") as info:
        inject_lora(model, LoRAConfig(target_modules=targets))
    assert "nn.Linear" in str(info.value) and "exclude_modules" in str(info.value)
    assert adapted(model) == set()


def test_grouped_conv_is_an_error():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 1))
    with pytest.raises(TypeError, match=r"target module '0' is a grouped convolution "
                                        r"\(groups=2\); LoRA supports groups=1 only"):
        inject_lora(model, LoRAConfig(target_modules=["0", "1"]))
    assert adapted(model) == set()


def test_dora_on_embedding_is_an_error():
    model = Net()
    with pytest.raises(TypeError, match=r"target module 'embed' is an nn\.Embedding, which "
                                        r"DoRA does not support"):
        inject_lora(model, LoRAConfig(target_modules=["query", "embed"], use_dora=True))
    assert adapted(model) == set()


def test_inject_requires_a_config():
    with pytest.raises(TypeError, match="expected a LoRAConfig, got dict"):
        inject_lora(Net(), {"r": 2})


def test_subclass_that_overrides_forward_is_refused_and_a_plain_one_adapted():
    # Issue 8: a subclass keeping Linear.forward computes what nn.Linear computes, so it
    # is adapted (keeping its own class); one with its own forward is refused by name.
    class MyLinear(nn.Linear):
        pass

    class Odd(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(MyLinear(2, 2), Odd(2, 2))
    with pytest.raises(TypeError, match=r"target module '1' has type .*Odd, a subclass of "
                                        r"nn\.Linear that overrides forward\(\)"):
        inject_lora(model, LoRAConfig(target_modules=["0", "1"]))
    assert adapted(model) == set()
    report = inject_lora(model, LoRAConfig(target_modules=["0"]))
    assert report.injected == ["0"] and isinstance(model[0], MyLinear)


# -- scale -------------------------------------------------------------------------------
def test_thousand_linear_layers():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(1000)])
    x = torch.randn(2, 4)
    with torch.no_grad():
        for m in model:
            m.weight.mul_(0.5)
            m.weight.add_(torch.eye(4))  # keep activations finite through 1000 layers
        y = model(x)
    report = inject_lora(model, LoRAConfig(r=2, target_modules="all-linear"))
    assert len(report.injected) == 1000
    assert len(set(report.injected)) == 1000
    assert all(isinstance(m, LoRALayer) for m in model)
    assert report.params.trainable == 1000 * 2 * (2 * 4)
    assert report.params.total == 1000 * 20 + report.params.trainable
    with torch.no_grad():
        assert torch.equal(model(x), y)
    assert inject_lora(model, LoRAConfig(r=2, target_modules="all-linear")).injected == []
