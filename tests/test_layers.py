"""Tests for the LoRA layer types: forward, merge/unmerge, merged state dicts, dropout,
train/eval behaviour and gradients, for every supported base type.

Expected values come from a reference written here from the math (ΔW = B·A in each base's
weight layout, y = W'x with W' = W + scale·ΔW, DoRA W' = m·(W + scale·ΔW)/‖·‖ per output),
not from the library's own ``merged_weight``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close_fp32, randomize_adapters
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lora_lightning import (
    LoRAConfig,
    LoRALayer,
    inject_lora,
    merge_lora,
    merged_state_dict,
    unload_lora,
    unmerge_lora,
)
from lora_lightning.layers import fused
from lora_lightning.layers import types as layer_types

try:  # transformers is optional: without it only the HF Conv1D cases skip
    from transformers.pytorch_utils import Conv1D
except ImportError:
    Conv1D = None


pytestmark = pytest.mark.usefixtures("one_thread")


class Wrap(nn.Module):
    """Holds the layer under test as ``layer`` so state-dict keys are ``layer.*``."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


# name -> (base factory, input factory)
LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), lambda g: torch.randn(3, 6, generator=g)),
    "conv1d_k1": (lambda: nn.Conv1d(4, 5, 1), lambda g: torch.randn(2, 4, 7, generator=g)),
    "conv1d_k3": (lambda: nn.Conv1d(4, 5, 3, padding=1),
                  lambda g: torch.randn(2, 4, 7, generator=g)),
    "conv2d_k1": (lambda: nn.Conv2d(3, 4, 1), lambda g: torch.randn(2, 3, 5, 5, generator=g)),
    "conv2d_k3_s2_p1": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1),
                        lambda g: torch.randn(2, 3, 7, 7, generator=g)),
    "embedding": (lambda: nn.Embedding(11, 6, padding_idx=0),
                  lambda g: torch.randint(0, 11, (3, 4), generator=g)),
    "hf_conv1d": (lambda: Conv1D(5, 6), lambda g: torch.randn(2, 3, 6, generator=g)),
}
VARIANTS = {
    "lora": {},
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "gaussian": {"init": "gaussian"},
    "dropout": {"dropout": 0.3},
}
CASES = [
    pytest.param(layer, variant, id=f"{layer}-{variant}")
    for layer in LAYERS for variant in VARIANTS
    if not (layer == "embedding" and variant == "dora")
]
R, ALPHA = 3, 5.0


def build(layer_name: str, variant: str, seed: int = 0, **extra):
    """(injected model, un-injected copy of the original, input, config)."""
    torch.manual_seed(seed)
    if layer_name == "hf_conv1d" and Conv1D is None:
        pytest.skip("the HF Conv1D cases need transformers")
    make, make_x = LAYERS[layer_name]
    base = Wrap(make())
    original = copy.deepcopy(base)
    cfg = LoRAConfig(r=R, alpha=ALPHA, target_modules=["layer"], **{**VARIANTS[variant], **extra})
    inject_lora(base, cfg)
    x = make_x(torch.Generator().manual_seed(seed + 1))
    return base, original, x, cfg


def ref_delta(layer) -> torch.Tensor:
    """B·A in the base weight's native layout, written independently of the library."""
    a, b = layer.lora_A.detach().float(), layer.lora_B.detach().float()
    if isinstance(layer, nn.Linear):
        return b @ a
    if isinstance(layer, nn.Conv1d | nn.Conv2d):
        return torch.einsum("or,r...->o...", b.reshape(b.shape[0], -1), a)
    return (b @ a).T  # Embedding (num, dim) and HF Conv1D (in, out)


def out_first(layer, w: torch.Tensor) -> torch.Tensor:
    hf = Conv1D is not None and isinstance(layer, Conv1D)
    return w.T if isinstance(layer, nn.Embedding) or hf else w


def ref_scaling(cfg: LoRAConfig) -> float:
    return ALPHA / math.sqrt(R) if cfg.use_rslora else ALPHA / R


def ref_merged_weight(layer, cfg: LoRAConfig) -> torch.Tensor:
    w = out_first(layer, layer.weight.detach().float()) + ref_scaling(cfg) * out_first(
        layer, ref_delta(layer)
    )
    if cfg.use_dora:
        norm = w.flatten(1).norm(dim=1)
        m = layer.lora_magnitude.detach().float().reshape(-1)
        w = w * (m / norm).reshape((-1,) + (1,) * (w.dim() - 1))
    return out_first(layer, w)


def weight_scale(*tensors: torch.Tensor) -> float:
    return max(float(t.abs().max()) for t in tensors)


# -- at injection ----------------------------------------------------------------------
@pytest.mark.parametrize(("layer_name", "variant"), CASES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_injected_output_equals_base_exactly(layer_name, variant, mode):
    model, original, x, _ = build(layer_name, variant)
    layer = model.layer
    assert isinstance(layer, LoRALayer) and isinstance(layer, type(original.layer))
    assert layer.merged is False
    if isinstance(layer, nn.Embedding):
        assert torch.count_nonzero(layer.lora_A) == 0
    else:
        assert torch.count_nonzero(layer.lora_B) == 0
    model.train(mode == "train")
    original.train(mode == "train")
    # Exact by construction: the adapted forward runs the base's own op on the same input
    # and adds an exact zero (B = 0; DoRA's m / ‖W‖ is 1, both norms from one function).
    torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)


@pytest.mark.parametrize(("layer_name", "variant"), CASES)
def test_keys_and_adapter_shapes(layer_name, variant):
    model, original, _, cfg = build(layer_name, variant)
    layer = model.layer
    adapter = {"layer.lora_A", "layer.lora_B"}
    if cfg.use_dora:
        adapter.add("layer.lora_magnitude")
    assert set(model.state_dict()) == set(original.state_dict()) | adapter
    delta = ref_delta(layer)
    assert delta.shape == layer.weight.shape
    assert layer.lora_A.shape[0] == R and layer.lora_B.shape[1] == R
    assert layer.scaling == pytest.approx(ref_scaling(cfg), rel=1e-12)


# -- forward math ----------------------------------------------------------------------
def functional_forward(original: nn.Module, weight: torch.Tensor, x: torch.Tensor):
    """The un-injected module's forward with ``weight`` swapped in."""
    ref = copy.deepcopy(original)
    with torch.no_grad():
        ref.layer.weight.copy_(weight)
    return ref(x)


@pytest.mark.parametrize(("layer_name", "variant"), CASES)
def test_forward_matches_reference_math(layer_name, variant):
    model, original, x, cfg = build(layer_name, variant)
    randomize_adapters(model)
    model.eval()
    expected = functional_forward(original, ref_merged_weight(model.layer, cfg), x)
    assert_close_fp32(model(x), expected)


# -- merge / unmerge -------------------------------------------------------------------
@pytest.mark.parametrize(("layer_name", "variant"), CASES)
def test_merge_unmerge_round_trip(layer_name, variant):
    model, _, x, cfg = build(layer_name, variant)
    randomize_adapters(model)
    model.eval()
    layer = model.layer
    w0 = layer.weight.detach().clone()
    y = model(x)
    expected_merged = ref_merged_weight(layer, cfg)
    assert merge_lora(model) == 1
    assert layer.merged is True
    scale = weight_scale(w0, expected_merged)
    assert (layer.weight - expected_merged).abs().max() <= 1e-5 * scale
    assert not torch.equal(layer.weight, w0)
    assert_close_fp32(model(x), y)
    assert merge_lora(model) == 0  # already merged: a no-op
    assert unmerge_lora(model) == 1
    assert layer.merged is False
    assert (layer.weight - w0).abs().max() <= 1e-5 * scale
    assert_close_fp32(model(x), y)
    assert unmerge_lora(model) == 0


@pytest.mark.parametrize(("layer_name", "variant"), CASES)
@pytest.mark.parametrize("merged", [False, True])
def test_merged_state_dict_loads_strictly_into_original(layer_name, variant, merged):
    model, original, x, cfg = build(layer_name, variant)
    randomize_adapters(model)
    model.eval()
    y = model(x)
    if merged:
        merge_lora(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = merged_state_dict(model)
    assert set(sd) == set(original.state_dict())
    fresh = copy.deepcopy(original)
    result = fresh.load_state_dict(sd, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert not any(isinstance(m, LoRALayer) for m in fresh.modules())
    assert_close_fp32(fresh(x), y)
    # The model itself is untouched.
    assert model.layer.merged is merged
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# -- merging into a tied weight --------------------------------------------------------
class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.body(self.emb(ids))))


TIED_IDS = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("how", ["merge_lora", "unload_lora"])
def test_merging_into_a_tied_weight_leaves_the_other_module_unchanged_or_refuses(how):
    """Either refused with an error that says 'tied' (model unchanged), or the other user
    of the weight (the head) keeps computing what it did."""
    torch.manual_seed(0)
    model = TiedLM().eval()
    head_weight = model.head.weight.detach().clone()
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["emb", "body"]))
    randomize_adapters(model)
    with torch.no_grad():
        y = model(TIED_IDS)
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
        assert_close_fp32(model(TIED_IDS), y)


# -- dropout ---------------------------------------------------------------------------
@pytest.mark.parametrize(("layer_name", "variant"), CASES)
def test_eval_mode_is_deterministic(layer_name, variant):
    model, _, x, _ = build(layer_name, variant)
    randomize_adapters(model)
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("layer_name", [n for n in LAYERS if n != "embedding"])
@pytest.mark.parametrize("variant", ["dropout", "dora"])
def test_train_mode_applies_dropout_to_adapter_path_only(layer_name, variant):
    model, _, x, _ = build(layer_name, variant, dropout=0.5)
    randomize_adapters(model)
    model.train()
    torch.manual_seed(1)
    y1 = model(x)
    y2 = model(x)
    assert not torch.allclose(y1, y2)  # different dropout masks
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("dora", [False, True])
def test_dropout_feeds_only_the_adapter_path(dora, monkeypatch):
    """y = Wx + b + s·B·A·drop(x); DoRA: y = Wx + b + (k-1)·W·drop(x) + k·s·B·A·drop(x)."""
    model, original, x, cfg = build("linear", "dora" if dora else "lora", dropout=0.5)
    randomize_adapters(model)
    model.train()
    layer = model.layer
    mask = (torch.arange(x.shape[-1]) % 2).float() * 2.0  # a fixed "dropout" mask

    def fixed_dropout(inp, p, training=True, inplace=False):
        assert p == 0.5 and training
        return inp * mask

    monkeypatch.setattr(F, "dropout", fixed_dropout)
    # the fused Linear path draws a boolean keep-mask instead (scaled by 1 / (1 - p))
    monkeypatch.setattr(fused, "dropout_mask", lambda inp, p: (mask > 0).expand_as(inp))
    xd = x * mask
    w, a, b = layer.weight.detach(), layer.lora_A.detach(), layer.lora_B.detach()
    s = ref_scaling(cfg)
    lora = s * xd @ a.T @ b.T
    base = original(x)
    if dora:
        k = layer.lora_magnitude.detach() / (w + s * b @ a).norm(dim=1)
        expected = base + (k - 1) * (xd @ w.T) + k * lora
    else:
        expected = base + lora
    assert_close_fp32(model(x), expected)
    assert not torch.allclose(expected, original(x) + s * x @ a.T @ b.T)  # the mask matters


@pytest.mark.parametrize(
    ("layer_name", "variant"),
    [(n, v) for n in LAYERS for v in ("lora", "dora") if (n, v) != ("embedding", "dora")],
)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_no_dropout_means_no_copy_of_the_input(layer_name, variant, mode, monkeypatch):
    model, _, x, _ = build(layer_name, variant)
    randomize_adapters(model)
    model.train(mode == "train")
    layer = model.layer
    seen = []
    original_lora_out = layer.lora_forward
    real_linear = F.linear

    def spy(inp, *adapter):
        seen.append(inp)
        return original_lora_out(inp, *adapter)

    def linear_spy(inp, weight, *args, **kwargs):
        # The fused Linear/Conv1D path feeds the input straight to A, without lora_forward.
        if weight is layer.lora_A and not seen:
            seen.append(inp)
        return real_linear(inp, weight, *args, **kwargs)

    real_fused = layer_types.linear_lora

    def fused_spy(inp, *args):
        # The one-node Linear/Conv1D path (training): its input goes to A as it is.
        seen.append(inp)
        return real_fused(inp, *args)

    def no_dropout(*args, **kwargs):
        raise AssertionError("F.dropout called with dropout=0")

    monkeypatch.setattr(layer, "lora_forward", spy)
    monkeypatch.setattr(F, "linear", linear_spy)
    monkeypatch.setattr(layer_types, "linear_lora", fused_spy)
    monkeypatch.setattr(F, "dropout", no_dropout)
    monkeypatch.setattr(fused, "dropout_mask", no_dropout)
    model(x)
    # The adapter saw x itself, or a view of x's memory (a reshape of a contiguous x):
    # never a copy.
    assert len(seen) == 1
    assert seen[0] is x or (
        seen[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        and seen[0].numel() == x.numel()
    )


def test_dropout_is_called_in_train_mode_only(monkeypatch):
    """Positive control for the monkeypatch used above."""
    model, _, x, _ = build("linear", "dropout")
    calls = []
    real = F.dropout

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    real_mask = fused.dropout_mask

    def counting_mask(*args, **kwargs):  # the fused Linear path's own draw
        calls.append(1)
        return real_mask(*args, **kwargs)

    monkeypatch.setattr(F, "dropout", counting)
    monkeypatch.setattr(fused, "dropout_mask", counting_mask)
    model.eval()
    model(x)
    assert calls == []
    model.train()
    model(x)
    assert calls == [1]


# -- train() / eval() never merge --------------------------------------------------------
@pytest.mark.parametrize(("layer_name", "variant"), CASES)
def test_train_eval_never_merge(layer_name, variant):
    model, _, x, _ = build(layer_name, variant)
    randomize_adapters(model)
    layer = model.layer
    w0 = layer.weight.detach().clone()
    for toggle in (model.eval, model.train, model.eval, lambda: setattr(layer, "training", False),
                   lambda: setattr(layer, "training", True)):
        toggle()
        assert layer.merged is False
        assert torch.equal(layer.weight, w0)
    model.eval()
    merge_lora(model)
    w_merged = layer.weight.detach().clone()
    for toggle in (model.train, model.eval, lambda: setattr(layer, "training", True)):
        toggle()
        assert layer.merged is True
        assert torch.equal(layer.weight, w_merged)


# -- gradients ---------------------------------------------------------------------------
@pytest.mark.parametrize(("layer_name", "variant"), CASES)
def test_gradients_reach_adapters_not_weight(layer_name, variant):
    model, _, x, cfg = build(layer_name, variant)
    randomize_adapters(model)
    model.train()
    layer = model.layer
    assert layer.weight.requires_grad is False
    model(x).pow(2).sum().backward()
    assert layer.weight.grad is None
    names = ["lora_A", "lora_B"] + (["lora_magnitude"] if cfg.use_dora else [])
    for name in names:
        grad = getattr(layer, name).grad
        assert grad is not None, name
        assert torch.count_nonzero(grad) > 0, name
    bias = getattr(layer, "bias", None)
    if bias is not None:
        assert bias.requires_grad is False and bias.grad is None  # bias="none"


# DoRA's norm is detached (the DoRA paper, section 4.3): checked through the gradients.
def dora_layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    wrapper = nn.Sequential(nn.Linear(6, 5) if kind == "linear" else nn.Conv2d(3, 4, 3, padding=1))
    inject_lora(wrapper, LoRAConfig(r=2, alpha=4, target_modules=["0"], use_dora=True))
    randomize_adapters(wrapper, 1, std=0.5)
    return wrapper[0]


def dora_reference(layer: nn.Module, x, a, b, m, detach: bool):
    """DoRA from its definition: y = m · (W + s·BA) x / ‖W + s·BA‖ + bias, the norm per
    output taken over the weight (detached, as the DoRA paper's section 4.3 does)."""
    w = layer.weight
    if isinstance(layer, nn.Linear):
        v = w + layer.scaling * b @ a
        norm = v.norm(dim=1)
        y = nn.functional.linear(x, v)
        return y * (m / (norm.detach() if detach else norm)) + layer.bias
    v = w + layer.scaling * (b.flatten(1) @ a.flatten(1)).reshape(w.shape)
    norm = v.flatten(1).norm(dim=1).view(1, -1, 1, 1)
    y = nn.functional.conv2d(x, v, padding=1)
    return y * (m / (norm.detach() if detach else norm)) + layer.bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_dora_gradients_match_the_detached_norm_math(kind):
    layer = dora_layer(kind)
    x = torch.randn((4, 6) if kind == "linear" else (2, 3, 5, 5),
                    generator=torch.Generator().manual_seed(2))
    proj = torch.randn(layer(x).shape, generator=torch.Generator().manual_seed(3))
    (layer(x) * proj).sum().backward()
    ours = [layer.lora_magnitude.grad, layer.lora_A.grad, layer.lora_B.grad]
    refs = {}
    for detach in (True, False):
        leaves = [t.detach().clone().requires_grad_(True)
                  for t in (layer.lora_magnitude, layer.lora_A, layer.lora_B)]
        m, a, b = leaves
        m_view = m.reshape(-1) if kind == "linear" else m.reshape(1, -1, 1, 1)
        (dora_reference(layer, x, a, b, m_view, detach) * proj).sum().backward()
        refs[detach] = [t.grad for t in leaves]
    for name, g, r in zip(("magnitude", "A", "B"), ours, refs[True], strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=name)
    # the non-detached norm gives other A/B gradients: this test could tell them apart
    differ = [not torch.allclose(g, r, rtol=1e-3, atol=1e-5)
              for g, r in zip(ours[1:], refs[False][1:], strict=True)]
    assert all(differ)


# -- property tests ----------------------------------------------------------------------
def _roundtrip_and_merged_sd(base: nn.Module, x: torch.Tensor, cfg: LoRAConfig, seed: int):
    torch.manual_seed(seed)
    model = Wrap(base)
    original = copy.deepcopy(model)
    inject_lora(model, cfg)
    randomize_adapters(model, seed, std=0.2)
    model.eval()
    layer = model.layer
    w0 = layer.weight.detach().clone()
    y = model(x)
    sd = merged_state_dict(model)
    fresh = copy.deepcopy(original)
    fresh.load_state_dict(sd, strict=True)
    assert_close_fp32(fresh(x), y)
    merge_lora(model)
    merged = layer.weight.detach().clone()
    assert_close_fp32(model(x), y)
    # Exact: merge_lora and merged_state_dict compute the weight with one function.
    torch.testing.assert_close(merged, sd["layer.weight"], rtol=0, atol=0)
    unmerge_lora(model)
    assert (layer.weight - w0).abs().max() <= 1e-5 * weight_scale(w0, merged)


_common = {
    "r": st.integers(1, 8),
    "alpha": st.floats(0.1, 32.0),
    "dora": st.booleans(),
    "rslora": st.booleans(),
    "seed": st.integers(0, 2**16),
}


@settings(max_examples=25, deadline=None)
@given(fan_in=st.integers(1, 32), fan_out=st.integers(1, 32), bias=st.booleans(), **_common)
def test_property_linear(fan_in, fan_out, bias, r, alpha, dora, rslora, seed):
    cfg = LoRAConfig(r=r, alpha=alpha, target_modules=["layer"], use_dora=dora,
                     use_rslora=rslora)
    x = torch.randn(4, fan_in, generator=torch.Generator().manual_seed(seed))
    _roundtrip_and_merged_sd(nn.Linear(fan_in, fan_out, bias=bias), x, cfg, seed)


@settings(max_examples=25, deadline=None)
@given(c_in=st.integers(1, 32), c_out=st.integers(1, 32), k=st.integers(1, 3),
       stride=st.integers(1, 2), padding=st.integers(0, 1), **_common)
def test_property_conv2d(c_in, c_out, k, stride, padding, r, alpha, dora, rslora, seed):
    cfg = LoRAConfig(r=r, alpha=alpha, target_modules=["layer"], use_dora=dora,
                     use_rslora=rslora)
    x = torch.randn(2, c_in, 5, 5, generator=torch.Generator().manual_seed(seed))
    _roundtrip_and_merged_sd(nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding), x, cfg,
                             seed)


# -- numerics --------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("layer_name", ["linear", "conv2d_k3_s2_p1", "hf_conv1d"])
def test_repeated_merge_unmerge_does_not_drift(layer_name, variant):
    model, _, _, _ = build(layer_name, variant)
    randomize_adapters(model)
    layer = model.layer
    w0 = layer.weight.detach().clone()
    for _ in range(100):
        layer.merge()
        layer.unmerge()
    assert layer.weight.dtype == torch.float32
    assert (layer.weight - w0).abs().max() < 1e-5


@pytest.mark.parametrize("layer_name", ["linear", "conv2d_k3_s2_p1", "hf_conv1d", "embedding"])
def test_bf16_merges_in_fp32_and_casts_once(layer_name):
    model, _, _, cfg = build(layer_name, "lora")
    model.to(torch.bfloat16)
    randomize_adapters(model)
    layer = model.layer
    assert layer.lora_A.dtype == torch.float32  # float32 adapters on a bf16 base (issue 19)
    w0 = layer.weight.detach().clone()
    delta = ref_delta(layer)  # float32 from the bf16 adapters
    expected = (w0.float() + layer.scaling * delta).to(torch.bfloat16)
    layer.merge()
    assert layer.weight.dtype == torch.bfloat16
    assert torch.equal(layer.weight, expected)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize(("rule", "adapters"), [(None, torch.float32), ("base", torch.bfloat16),
                                                ("float64", torch.float64)])
def test_bf16_injection_keeps_the_base_dtype_and_gives_adapters_theirs(dora, rule, adapters):
    """On a bf16 base, adapters are float32 by default (adapter_dtype="base": bf16); the
    base keeps its dtype and every layer's output stays bf16."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)).to(torch.bfloat16)
    inject_lora(model, LoRAConfig(r=2, target_modules="all-linear", use_dora=dora,
                                  adapter_dtype=rule))
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {adapters}
    y = model(torch.randn(3, 8, dtype=torch.bfloat16))  # layer 2 needs a bf16 input
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad.dtype == adapters for n, p in model.named_parameters() if "lora_A" in n)


def test_converting_the_model_keeps_each_adapter_in_its_dtype():
    """model.to(torch.bfloat16) (what precision="bf16-true" does) keeps float32 adapters;
    with adapter_dtype="base" they follow the base."""
    for rule, want in ((None, torch.float32), ("base", torch.bfloat16)):
        model = nn.Sequential(nn.Linear(8, 8))
        inject_lora(model, LoRAConfig(r=2, target_modules=["0"], adapter_dtype=rule))
        model.to(torch.bfloat16)
        assert model[0].weight.dtype == torch.bfloat16 and model[0].lora_B.dtype == want
        model.double()
        assert model[0].lora_B.dtype == torch.float64  # not a half base: the base's dtype


@pytest.mark.parametrize("rows", [64, "fold"])
def test_inference_without_autograd_folds_only_from_many_rows_and_matches_the_adapter_path(rows):
    """Under no_grad on CPU, a Linear LoRA layer folds W + sBA into one matmul only from
    FOLD_MIN_ROWS rows (below that the fold measured slower: bench_forward_paths.py); below
    it, it runs the autograd path's base op plus two skinny matmuls. Both equal that path."""
    from lora_lightning.layers.base import FOLD_MIN_ROWS

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24))
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["0"]))
    layer = model[0]
    randomize_adapters(model, std=1.0)
    n = FOLD_MIN_ROWS if rows == "fold" else rows
    x = torch.randn(2, n // 2, 32)
    calls = []
    real = F.linear
    try:
        F.linear = lambda inp, w, *a, **k: calls.append(w) or real(inp, w, *a, **k)
        with torch.no_grad():
            inference = layer(x)
    finally:
        F.linear = real
    if rows == "fold":  # one matmul, with a weight that is not the layer's own
        assert len(calls) == 1 and calls[0].shape == (24, 32) and calls[0] is not layer.weight
    else:
        assert [w for w in calls if w is not layer.weight and w is not layer.lora_A] == []
    adapter_path = layer(x)  # grad enabled: base op plus B(Ax)
    assert_close_fp32(inference, adapter_path)


@pytest.mark.parametrize("shape", [(7,), (5, 7), (2, 3, 7)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("adapter_dtype", [None, "float64"])
def test_single_adapter_without_grad_equals_the_formula(shape, bias, adapter_dtype):
    """The single-adapter forward without grad (base op, then one ``addmm_``; it skips a
    reshape for 2-D input and casts only when dtypes differ) computes W x + b + s·B(A x)
    for 1-, 2- and 3-D input, with adapters of the base's dtype or another one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5, bias=bias))
    inject_lora(model, LoRAConfig(r=3, alpha=9, target_modules=["0"],
                                  adapter_dtype=adapter_dtype), adapter="a0")
    randomize_adapters(model, std=1.0)
    layer = model[0]
    a, b = layer.lora_A_a0.detach(), layer.lora_B_a0.detach()
    assert a.dtype == (torch.float64 if adapter_dtype else torch.float32)
    x = torch.randn(shape)
    expected = F.linear(x, layer.weight, layer.bias) + 3.0 * F.linear(
        F.linear(x.to(a.dtype), a), b).float()
    assert layer._route(x, ["a0"], False) == "fused"  # with grad
    with torch.no_grad():
        assert layer._route(x, ["a0"], False) == "in_place"
        out = layer(x)
    assert out.shape == (*shape[:-1], 5) and out.dtype == torch.float32
    assert_close_fp32(out, expected)
    assert (out - F.linear(x, layer.weight, layer.bias)).abs().max() > 0.1  # the adapter adds


def test_single_adapter_without_grad_under_autocast_and_dropout_in_train_mode():
    """Without grad, autocast gives the base op's dtype (the update is cast to it by hand:
    ``addmm_`` skips autocast), and LoRA dropout in train mode still drops the adapter's
    input (the same draw as ``F.dropout`` from the same seed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    inject_lora(model, LoRAConfig(r=2, alpha=4, dropout=0.5, target_modules=["0"]))
    randomize_adapters(model, std=1.0)
    layer = model[0].eval()
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    x = torch.randn(4, 3, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        base = F.linear(x, layer.weight, layer.bias)
    assert out.dtype == base.dtype == torch.bfloat16
    expected = F.linear(x, layer.weight, layer.bias) + 2.0 * F.linear(F.linear(x, a), b)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=5e-2)
    layer.train()
    torch.manual_seed(1)
    with torch.no_grad():
        dropped = layer(x)
    torch.manual_seed(1)
    xd = F.dropout(x.reshape(-1, 8), 0.5, training=True).reshape(x.shape)
    expected = F.linear(x, layer.weight, layer.bias) + 2.0 * F.linear(F.linear(xd, a), b)
    assert_close_fp32(dropped, expected)
    assert (dropped - layer.eval()(x)).abs().max() > 1e-3  # dropout changed something
