"""The architecture matrix (issue 8): every check on every tiny real architecture.

Each case in ``_arch_cases.CASES`` (HF models from tiny configs, torch's TransformerEncoder,
Lightning's demo Transformer, a dilated CNN with padding modes, an embedding model) is
adapted on its attention projections, and where marked also with ``"all-linear"``. Checks:

* ``injection``: the output is unchanged right after injection (B = 0);
* ``counts``: the trainable parameter count equals PEFT's for the same config;
* ``merge``: after one optimizer step (in eval mode) every adapter got a gradient, the
  output moved, merged equals unmerged and unmerging restores the weights;
* ``merged_state_dict``: it loads strictly into a fresh plain model, same output;
* ``base_state_dict``: a base state dict loads strictly, one missing base weight is refused;
* ``peft_files``: our ``save_adapter`` loads in PEFT and PEFT's ``save_pretrained`` loads
  here, with equal outputs;
* ``grads``: for the same non-zero adapter values, every adapter gradient equals PEFT's.

Cases that fail today because of an issue-8 bug are ``xfail(strict=True)`` with the item.
"""

from __future__ import annotations

import copy
import functools
import re
import warnings

import pytest
import torch
from _arch_cases import CASES, Case, flat_output, loss_weights
from _helpers import assert_close_fp32, randomize_adapters
from torch import Tensor, nn
from torch.func import functional_call

from lora_lightning import (
    LoRAConfig,
    count_parameters,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    merged_state_dict,
    save_adapter,
    unmerge_lora,
)
from lora_lightning.io.peft_format import to_peft_keys

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

R, ALPHA = 2, 4.0
HEAD_NAMES = {"lm_head", "classifier", "score", "head", "output_layer"}
BY_NAME = {c.name: c for c in CASES}


# -- parametrisation ------------------------------------------------------------------
def variants(check: str, needs_peft: bool = False) -> list:
    """``pytest.param(case, targets)`` for every case and variant that ``check`` applies to,
    carrying the case's xfail marker for this check."""
    out = []
    for case in CASES:
        options = [("targets", case.targets, case.xfail)]
        if case.all_linear and (not needs_peft or case.peft_all_linear):
            options.append(("all-linear", "all-linear", {**case.xfail, **case.xfail_all_linear}))
        for label, targets, xfail in options:
            reason = xfail.get(check) or xfail.get("*")
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(pytest.param(case, targets, marks=marks, id=f"{case.name}-{label}"))
    return out


# -- helpers --------------------------------------------------------------------------
def _pristine(case: Case, seed: int) -> tuple[nn.Module, dict[str, Tensor]]:
    return _built(case.name, seed)


@functools.cache
def _built(name: str, seed: int) -> tuple[nn.Module, dict[str, Tensor]]:
    case = BY_NAME[name]
    if case.hf:
        pytest.importorskip("transformers")
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = case.build().eval()
    return model, case.inputs()


def base(case: Case, seed: int = 0) -> nn.Module:
    """A fresh copy of the case's plain model, in eval mode."""
    return copy.deepcopy(_pristine(case, seed)[0])


def inputs(case: Case) -> dict[str, Tensor]:
    return _pristine(case, 0)[1]


def run(model: nn.Module, case: Case) -> Tensor:
    return flat_output(model(**inputs(case)))


@torch.no_grad()
def output(model: nn.Module, case: Case) -> Tensor:
    return run(model, case).detach().clone()


def config(targets) -> LoRAConfig:
    return LoRAConfig(r=R, alpha=ALPHA, target_modules=targets)


def injected(case: Case, targets) -> nn.Module:
    model = base(case)
    inject_lora(model, config(targets))
    return model


def head_subtree(model: nn.Module) -> list[str]:
    """Linear-like modules that ``"all-linear"`` must leave alone: those named like a head,
    everything below one, and the output embedding (README: "all-linear" rules)."""
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    names = []
    for name, m in model.named_modules():
        if HEAD_NAMES & set(name.split(".")) or (out_emb is not None and m is out_emb):
            names.append(name)
    return names


def peft_model(peft, case: Case, targets):
    """PEFT on a fresh base copy with our config; for "all-linear", PEFT's own linear set
    less the heads our rule leaves out (PEFT keeps heads unless told the task type)."""
    model = base(case)
    exclude = head_subtree(model) if targets == "all-linear" else None
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets,
                          exclude_modules=exclude or None)
    return peft.get_peft_model(model, cfg)


def assert_moved(y: Tensor, y_base: Tensor) -> None:
    moved = (y - y_base).abs().max() / y_base.abs().max()
    assert moved > 5e-4, f"the adapters barely change the output (relative {moved:.1e})"


def refuse_tied(case: Case, fn):
    """Run ``fn``; for a tied case an error whose message says 'tied' is correct too."""
    if not case.tied:
        return fn()
    try:
        return fn()
    except Exception as err:  # any type: the behaviour asked of issue 8 item 4
        if "tied" in str(err).lower():
            return None
        raise


def adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {
        f"{n}.{p}": getattr(m, p) for n, m in lora_layers(model).items()
        for p in m.adapter_param_names()
    }


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


# -- the checks -----------------------------------------------------------------------
@pytest.mark.parametrize(("case", "targets"), variants("injection"))
def test_injection_keeps_output(case, targets):
    y_base = output(base(case), case)
    model = injected(case, targets)
    assert lora_layers(model)
    assert_close_fp32(output(model, case), y_base)  # B = 0, but the adapted forward differs


@pytest.mark.parametrize(("case", "targets"), variants("counts", needs_peft=True))
def test_trainable_count_equals_peft(case, targets, peft):
    model = injected(case, targets)
    pm = peft_model(peft, case, targets)
    trainable, _ = pm.get_nb_trainable_parameters()
    assert count_parameters(model).trainable == trainable
    peft_names = {n.removeprefix("base_model.model.").replace(".base_layer", "")
                  for n, m in pm.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(lora_layers(model)) == peft_names


def step(model: nn.Module, case: Case) -> None:
    """One Adam step on a fixed random projection of the output, in the model's mode.
    Every adapted layer must receive a non-zero gradient (no adapter may be bypassed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.05)
    y = run(model, case)
    (y * loss_weights(y)).sum().backward()
    for name, layer in lora_layers(model).items():
        grads = [getattr(layer, p).grad for p in layer.adapter_param_names()]
        assert any(g is not None and g.abs().max() > 0 for g in grads), name
    opt.step()


@pytest.mark.parametrize(("case", "targets"), variants("merge"))
def test_merge_after_a_step_equals_unmerged_and_unmerge_restores(case, targets):
    y_base = output(base(case), case)
    model = injected(case, targets)
    step(model, case)  # eval mode, as a user fine-tuning without dropout would
    y = output(model, case)
    assert_moved(y, y_base)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    if refuse_tied(case, lambda: merge_lora(model)) is None:
        assert all(not m.merged for m in lora_layers(model).values())
    else:
        assert all(m.merged for m in lora_layers(model).values())
        assert_close_fp32(output(model, case), y)
        unmerge_lora(model)
    for k, v in model.state_dict().items():
        assert_close_fp32(v, weights[k], msg=k)  # W + ΔW - ΔW: W up to rounding
    assert_close_fp32(output(model, case), y)


@pytest.mark.parametrize(("case", "targets"), variants("merged_state_dict"))
def test_merged_state_dict_loads_strictly_into_plain_model(case, targets):
    model = injected(case, targets)
    randomize_adapters(model, 1)
    y = output(model, case)
    sd = refuse_tied(case, lambda: merged_state_dict(model))
    if sd is None:
        return  # refused, naming the tied weight
    plain = base(case, seed=1)  # other weights, so the load must overwrite every one
    plain.load_state_dict(sd, strict=True)
    assert_close_fp32(output(plain, case), y)
    assert all(not m.merged for m in lora_layers(model).values())  # model untouched


@pytest.mark.parametrize(("case", "targets"), variants("base_state_dict"))
def test_base_state_dict_loads_strictly_and_a_missing_weight_is_refused(case, targets):
    model = injected(case, targets)
    randomize_adapters(model, 1)
    adapters = {k: v.detach().clone() for k, v in adapter_params(model).items()}
    other = base(case, seed=1).state_dict()
    result = model.load_state_dict(other, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    sd = model.state_dict()
    for k, v in other.items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=0, msg=k)
    for k, v in adapters.items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=0, msg=k)  # kept, not reset
    adapted = sorted(f"{n}.weight" for n in lora_layers(model))
    frozen = sorted(k for k, p in model.named_parameters()
                    if not p.requires_grad and k not in adapted)
    for key in {adapted[0], frozen[0]}:
        partial = {k: v for k, v in other.items() if k != key}
        with pytest.raises(RuntimeError) as err:
            model.load_state_dict(partial, strict=True)
        assert key in str(err.value)


@torch.no_grad()
def peft_output(pm, case: Case) -> Tensor:
    pm.train(case.peft_train_mode)
    return flat_output(pm(**inputs(case))).detach().clone()


def our_output_in_peft_mode(model: nn.Module, case: Case) -> Tensor:
    model.train(case.peft_train_mode)
    try:
        return output(model, case)
    finally:
        model.eval()


@pytest.mark.parametrize(("case", "targets"), variants("peft_files", needs_peft=True))
def test_peft_files_load_both_ways(case, targets, peft, tmp_path):
    from safetensors.torch import load_file

    y_base = output(base(case), case)
    # ours -> PEFT
    model = injected(case, targets)
    randomize_adapters(model, 1)
    save_adapter(model, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(base(case), str(tmp_path / "ours"))
    ours_file = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    if case.peft_forward:
        y = our_output_in_peft_mode(model, case)
        assert_moved(y, y_base)
        assert_close_fp32(peft_output(pm, case), y)
    else:
        loaded = peft.get_peft_model_state_dict(pm)
        assert set(loaded) == set(ours_file)
        for k, v in ours_file.items():
            torch.testing.assert_close(loaded[k], v, rtol=0, atol=0, msg=k)
    # PEFT -> ours
    pm = peft_model(peft, case, targets)
    randomize_adapters(pm, 2)
    pm.save_pretrained(str(tmp_path / "peft"))
    fresh = base(case)
    load_adapter(fresh, tmp_path / "peft")
    fresh.eval()
    if case.peft_forward:
        y = peft_output(pm, case)
        assert_moved(y, y_base)
        assert_close_fp32(our_output_in_peft_mode(fresh, case), y)
    else:
        save_adapter(fresh, tmp_path / "again")
        again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
        expected = peft.get_peft_model_state_dict(pm)
        assert set(again) == set(expected)
        for k, v in expected.items():
            torch.testing.assert_close(again[k], v, rtol=0, atol=0, msg=k)


def _file_key(peft_param_name: str) -> str:
    return re.sub(r"\.default(?=\.|$)", "", peft_param_name)


def peft_grads(peft, case: Case, targets, model: nn.Module) -> dict[str, Tensor]:
    """PEFT's adapter gradients for the adapter values of ``model``, keyed as PEFT's files."""
    pm = peft_model(peft, case, targets)
    values = to_peft_keys(model, {k: v.detach() for k, v in adapter_params(model).items()})
    result = peft.set_peft_model_state_dict(pm, values)
    assert not result.unexpected_keys
    pm.train(case.peft_train_mode)
    y = flat_output(pm(**inputs(case)))
    (y * loss_weights(y)).sum().backward()
    return {_file_key(n): p.grad for n, p in pm.named_parameters() if p.requires_grad}


def reference_grads(case: Case, model: nn.Module) -> dict[str, Tensor]:
    """Gradients from the merged-weight math: the plain model run with
    W + scale·ΔW(A, B) for each adapted layer, written independently of the layers."""
    plain = base(case)
    params = {k: v.detach() for k, v in plain.named_parameters()}
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in adapter_params(model).items()}
    for name, layer in lora_layers(model).items():
        a, b = leaves[f"{name}.lora_A"], leaves[f"{name}.lora_B"]
        w = params[f"{name}.weight"]
        if isinstance(layer, nn.Conv1d | nn.Conv2d):
            delta = (b.flatten(1) @ a.flatten(1)).reshape(w.shape)
        elif isinstance(layer, nn.Linear):
            delta = b @ a
        else:
            raise AssertionError(f"no reference formula for {type(layer).__name__}")
        params[f"{name}.weight"] = w + layer.scaling * delta
    y = flat_output(functional_call(plain, params, kwargs=inputs(case)))
    (y * loss_weights(y)).sum().backward()
    return to_peft_keys(model, {k: v.grad for k, v in leaves.items()})


@pytest.mark.parametrize(("case", "targets"), variants("grads", needs_peft=True))
def test_gradients_equal_peft(case, targets, peft):
    model = injected(case, targets)
    randomize_adapters(model, 3)
    model.train(case.peft_train_mode)
    y = run(model, case)
    (y * loss_weights(y)).sum().backward()
    ours = to_peft_keys(model, {k: v.grad for k, v in adapter_params(model).items()})
    if case.peft_forward:
        reference = peft_grads(peft, case, targets, model)
    else:
        reference = reference_grads(case, model)
    assert set(ours) == set(reference)
    for key, g in ours.items():
        ref = reference[key]
        assert ref.abs().max() > 0, f"{key}: the reference gradient is zero"
        scale = ref.abs().max().item()
        # A key projection's gradient cancels (softmax ignores a shift shared by all keys),
        # so float32 noise reaches ~2e-6 of its largest entry on some machines and test
        # orders (Whisper's k_proj); a wrong formula is off by far more than 1e-5.
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5 * scale, msg=key)


@pytest.mark.parametrize("name", ["roberta_cls", "vit_cls"])
def test_peft_all_linear_adapters_with_a_rank_above_a_3_class_head_load_with_peft_outputs(
        name, peft, tmp_path):
    """Issue 18: PEFT's all-linear (which adapts the 3-class head too) at r=4 was refused
    here ("rank 4, larger than the layer allows"); it loads, warns naming the head, and
    gives PEFT's outputs."""
    import warnings

    case = next(c for c in CASES if c.name == name)
    pm = peft.get_peft_model(base(case), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                         target_modules="all-linear"))
    randomize_adapters(pm, 3)
    pm.save_pretrained(str(tmp_path))
    want = peft_output(pm, case)
    model = base(case)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_adapter(model, tmp_path)
    assert any("larger than the layer" in str(w.message) and "classifier" in str(w.message)
               for w in caught), [str(w.message) for w in caught]
    model.train(case.peft_train_mode)
    assert_close_fp32(output(model, case), want)
    assert_moved(want, output(base(case), case))
