"""``model.generate`` of a transformers causal LM inside ``per_sample_adapters`` (issue 22,
item 3): each sequence keeps its own adapter through the prefill and every decode step (KV
cache on), equal to generating with that adapter alone; beam search and
``num_return_sequences`` run with each name repeated per row, and without it the error
says so."""

from __future__ import annotations

import pytest
import torch

from lora_lightning import (
    LoRAConfig,
    PerSampleBatchError,
    disable_adapters,
    inject_lora,
    per_sample_adapters,
    set_adapter,
)
from tests._helpers import randomize_adapters
from tests._tiny_lm import make_tiny_lm

TEXTS = ["To be, or not", "My lord", "Whether 'tis nobler in the mind", "The slings"]
NAMES = ["a", "c", None, "b"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_tiny_lm(tmp_path_factory.mktemp("gen_lm"))
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.padding_side = "left"
    for k, name in enumerate("abc"):
        targets = ["q_proj", "v_proj"] if name != "c" else "all-linear"
        inject_lora(model, LoRAConfig(r=2 + 2 * k, alpha=8, target_modules=targets),
                    adapter=name)
        randomize_adapters(model, seed=k, std=0.5, adapter=name)
    return model, tok


def _alone(model, tok, text, name, **kw):
    """The new tokens of ``text`` generated with adapter ``name`` alone (None: the base)."""
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        if name is None:
            with disable_adapters(model):
                out = model.generate(**enc, do_sample=False, pad_token_id=tok.pad_token_id, **kw)
        else:
            set_adapter(model, name)
            out = model.generate(**enc, do_sample=False, pad_token_id=tok.pad_token_id, **kw)
    return out[:, enc["input_ids"].shape[1]:].tolist()


def _mixed(model, tok, names, **kw):
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any(), "the batch must hold left padding"
    with torch.no_grad(), per_sample_adapters(model, names):
        out = model.generate(**enc, do_sample=False, pad_token_id=tok.pad_token_id, **kw)
    return out[:, enc["input_ids"].shape[1]:].tolist()


def test_greedy_generation_gives_each_sequence_its_own_adapter(lm):
    model, tok = lm
    mixed = _mixed(model, tok, NAMES, max_new_tokens=8)
    alone = [_alone(model, tok, t, n, max_new_tokens=8)[0] for t, n in zip(TEXTS, NAMES, strict=True)]
    assert mixed == alone
    # The adapters differ from each other and from the base on these prompts, so the
    # equality above could not hold with one adapter (or none) for every sequence.
    first = TEXTS[0]
    outs = {n: _alone(model, tok, first, n, max_new_tokens=8)[0] for n in ["a", "b", "c", None]}
    assert len({tuple(v) for v in outs.values()}) == 4


def test_beam_search_with_each_name_repeated_per_row(lm):
    model, tok = lm
    kw = {"max_new_tokens": 5, "num_beams": 2, "num_return_sequences": 2}
    mixed = _mixed(model, tok, [n for n in NAMES for _ in range(2)], **kw)
    alone = [row for t, n in zip(TEXTS, NAMES, strict=True) for row in _alone(model, tok, t, n, **kw)]
    assert mixed == alone


def test_beam_search_without_repeated_names_says_how(lm):
    model, tok = lm
    with pytest.raises(PerSampleBatchError, match=r"num_beams=2 .*range\(2\)"):
        _mixed(model, tok, NAMES, max_new_tokens=2, num_beams=2)


def test_stacked_adapters_are_rebuilt_when_an_adapter_changes(lm):
    """Without grad, each layer keeps its adapters stacked across forwards and blocks (a
    generate()'s decode steps, a server's batches); an in-place change to an adapter (an
    optimizer step, a load), a new adapter or a deleted one must show in the next forward
    all the same."""
    model, tok = lm
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    layer = model.model.layers[0].self_attn.q_proj

    def run(names=NAMES):
        with torch.no_grad(), per_sample_adapters(model, names):
            return model(**enc).logits

    first = run()
    stack = layer.__dict__["_lora_stack"]
    torch.testing.assert_close(run(), first, rtol=0, atol=0)
    assert layer.__dict__["_lora_stack"][2] is stack[2]  # reused, not rebuilt
    with torch.no_grad():
        layer.lora_B_a.add_(0.5)
    try:
        changed = run()
        assert layer.__dict__["_lora_stack"][2] is not stack[2]
        assert (changed[0] - first[0]).abs().max() > 1e-3  # sample 0 uses adapter a
        torch.testing.assert_close(changed[1:], first[1:], rtol=0, atol=0)
        with torch.no_grad():  # adapter a alone on the same padded batch: the reference
            set_adapter(model, "a")
            alone = model(**enc).logits
        torch.testing.assert_close(changed[0], alone[0], rtol=1e-4, atol=1e-5)
    finally:
        with torch.no_grad():
            layer.lora_B_a.sub_(0.5)
    # An adapter added, used, deleted and added again with other values under the same
    # name: each forward sees the values the model holds then.
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
                adapter="d")
    randomize_adapters(model, seed=11, std=0.5, adapter="d")
    with_d = run(["d", "a", None, "b"])
    from lora_lightning import delete_adapter

    delete_adapter(model, "d")
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
                adapter="d")
    randomize_adapters(model, seed=12, std=0.5, adapter="d")
    again = run(["d", "a", None, "b"])
    delete_adapter(model, "d")
    assert (with_d[0] - again[0]).abs().max() > 1e-3
    torch.testing.assert_close(again[1:], with_d[1:], rtol=0, atol=0)
