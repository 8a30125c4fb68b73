"""One focused regression test per core item of issue 8; each fails today (strict xfail)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_lightning import (
    LoRAConfig,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
    unload_lora,
    unmerge_lora,
)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def xfail(item: int, why: str):
    return pytest.mark.xfail(strict=True, reason=f"issue 8 item {item}: {why}")


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))


# -- item 1: torch's fast path -------------------------------------------------------
def encoder_layer() -> nn.Module:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0,
                                      batch_first=True).eval()


def test_encoder_layer_in_eval_mode_uses_its_adapters():
    base = encoder_layer()
    layer = copy.deepcopy(base)
    inject_lora(layer, LoRAConfig(r=2, alpha=4, target_modules=["linear1", "linear2"]))
    randomize(layer)
    with torch.no_grad():
        y_eval = layer(X)
        y_train = layer.train()(X)  # dropout 0: the same function, on the slow path
        layer.eval()
        assert (y_eval - base(X)).abs().max() > 1e-2
    torch.testing.assert_close(y_eval, y_train, rtol=1e-5, atol=1e-6)


def test_encoder_layer_trains_in_eval_mode():
    layer = encoder_layer()
    inject_lora(layer, LoRAConfig(r=2, alpha=4, target_modules=["linear1", "linear2"]))
    layer(X).square().mean().backward()
    for name, m in lora_layers(layer).items():
        assert m.lora_B.grad is not None and m.lora_B.grad.abs().max() > 0, name


# -- item 2: nn.MultiheadAttention ----------------------------------------------------
class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def attention() -> nn.Module:
    torch.manual_seed(0)
    return Attention().eval()


def test_multihead_attention_adapts_in_proj_and_out_proj():
    base = attention()
    model = copy.deepcopy(base)
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["attn"]))
    with torch.no_grad():
        torch.testing.assert_close(model(X), base(X), rtol=0, atol=1e-6)
    randomize(model)
    with torch.no_grad():
        y = model(X)  # eval mode: the fast path must not bypass the adapters
        assert (y - base(X)).abs().max() > 1e-2
        torch.testing.assert_close(model.train()(X), y, rtol=1e-5, atol=1e-6)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model)
    # both the packed input projection and the output projection carry an update
    assert not torch.allclose(model.attn.in_proj_weight, base.attn.in_proj_weight)
    assert not torch.allclose(model.attn.out_proj.weight, base.attn.out_proj.weight)
    with torch.no_grad():
        torch.testing.assert_close(model(X), y, rtol=1e-5, atol=1e-6)
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.xfail(strict=True, reason="PEFT 0.21.2 applies an nn.MultiheadAttention out_proj adapter twice; ours matches W + scale*B*A")
def test_multihead_attention_adapter_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    base = attention()
    model = copy.deepcopy(base)
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["attn"]))
    randomize(model)
    save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).train()
    with torch.no_grad():  # train mode (dropout 0): PEFT's own MHA is bypassed in eval
        torch.testing.assert_close(pm(X), model.train()(X), rtol=1e-5, atol=1e-6)


def test_out_proj_alone_is_adapted_or_refused_naming_multihead_attention():
    base = attention()
    model = copy.deepcopy(base)
    try:
        inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["attn.out_proj"]))
    except Exception as err:  # refusing is correct if it says why
        assert "MultiheadAttention" in str(err)
        return
    randomize(model)
    with torch.no_grad():
        y = model(X)
        assert (y - base(X)).abs().max() > 1e-2  # not bypassed by MHA's functional forward
        merge_lora(model)
        torch.testing.assert_close(model(X), y, rtol=1e-5, atol=1e-6)


# -- item 3: PEFT's embedding save ----------------------------------------------------
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
    randomize(pm)
    pm.save_pretrained(str(tmp_path))  # default save_embedding_layers="auto"
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.embed_tokens.base_layer.weight" in keys  # the case at issue
    with torch.no_grad():
        return pm.eval()(IDS)


def embedder() -> nn.Module:
    torch.manual_seed(0)
    return Embedder().eval()


def test_peft_default_save_of_an_embedding_adapter_loads(tmp_path):
    peft = pytest.importorskip("peft")
    base = embedder()
    y = peft_embedder(peft, base, tmp_path)
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(IDS), y, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.embed_tokens.weight, base.embed_tokens.weight)


def test_peft_embedding_save_with_another_base_is_refused_or_applied(tmp_path):
    """The saved base embedding differs from ours: refused naming it, or applied."""
    peft = pytest.importorskip("peft")
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
        torch.testing.assert_close(model.eval()(IDS), y, rtol=1e-5, atol=1e-6)


# -- item 4: tied weights -------------------------------------------------------------
class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.body(self.emb(ids))))


@pytest.mark.parametrize("how", ["merge_lora", "unload_lora"])
def test_merging_into_a_tied_weight_leaves_the_other_module_unchanged_or_refuses(how):
    """Either refused with an error that says 'tied' (model unchanged), or the other user
    of the weight (the head) keeps computing what it did."""
    torch.manual_seed(0)
    model = TiedLM().eval()
    head_weight = model.head.weight.detach().clone()
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["emb", "body"]))
    randomize(model)
    with torch.no_grad():
        y = model(IDS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        merge_lora(model) if how == "merge_lora" else unload_lora(model)
    except Exception as err:
        assert "tied" in str(err).lower()
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
        return
    assert torch.equal(model.head.weight, head_weight)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), y, rtol=1e-5, atol=1e-6)


# -- item 5: every entry must match ---------------------------------------------------
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


# -- item 6: all-linear and heads -----------------------------------------------------
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
    randomize(model)
    with torch.no_grad():
        y = model(x)
        assert (y - base(x)).abs().max() > 1e-3
        merge_lora(model)
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
