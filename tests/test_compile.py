"""``torch.compile`` on injected models: no graph breaks (``torch._dynamo.explain``) for one
adapter in training and inference and for a mixed batch, and no recompile when
``hotswap_adapter`` loads another adapter of the same rank. Graphs are counted with a
backend that runs them eagerly, so nothing is compiled to machine code (fast)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo as dynamo
from _helpers import assert_close_fp32, randomize_adapters
from torch import nn

from lora_lightning import (
    AdapterLoadError,
    LoRAConfig,
    adapter_state_dict,
    hotswap_adapter,
    inject_lora,
    per_sample_adapters,
    save_adapter,
    set_adapter,
)

pytestmark = pytest.mark.usefixtures("one_thread")
transformers = pytest.importorskip("transformers")


class Layers(nn.Module):
    """Embedding, Conv1d and Linear: every plain layer type in one small net."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)

    def forward(self, input_ids):
        h = self.conv(self.emb(input_ids).transpose(1, 2)).transpose(1, 2)
        return self.fc(h)


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg), "all-linear"


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64,
                                  n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg), ["c_attn", "c_proj", "c_fc"]


MODELS = {"layers": lambda: (Layers(), ["emb", "conv", "fc"]), "llama": _llama,
          "gpt2": _gpt2}


def _injected(kind: str, adapters=("default",)) -> nn.Module:
    model, targets = MODELS[kind]()
    for name in adapters:
        inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=targets), adapter=name)
    randomize_adapters(model)
    return model


def _ids():
    return torch.randint(0, 10, (2, 6), generator=torch.Generator().manual_seed(0))


def _breaks(model, **inputs) -> list[str]:
    dynamo.reset()
    out = dynamo.explain(model)(**inputs)
    return [str(r) for r in out.break_reasons] if out.graph_break_count else []


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_one_adapter_compiles_without_graph_breaks(kind):
    model = _injected(kind)
    model.train()  # with grad: the one-node Linear path, when the model has Linear layers
    assert _breaks(model, input_ids=_ids()) == []
    model.eval()
    with torch.no_grad():
        assert _breaks(model, input_ids=_ids()) == []


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_mixed_batch_compiles_without_graph_breaks(kind):
    model = _injected(kind, ("default", "other")).eval()
    with torch.no_grad(), per_sample_adapters(model, ["other", "default"]):
        assert _breaks(model, input_ids=_ids()) == []


class Counter:
    """A compile backend that counts the graphs it is handed and runs them eagerly."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_a_same_rank_hotswap_does_not_recompile(tmp_path):
    model = _injected("llama").eval()
    other = copy.deepcopy(model)
    randomize_adapters(other, seed=5)
    # Another alpha: folded into B, so the layer's scale (a graph constant) stays.
    source, _ = _llama()
    inject_lora(source, LoRAConfig(r=2, alpha=8, target_modules="all-linear"))
    source.load_state_dict(other.state_dict(), strict=False)
    save_adapter(source, tmp_path / "other")
    ids = _ids()
    with torch.no_grad():
        expected = source(input_ids=ids).logits
        before = model(input_ids=ids).logits
    assert not torch.allclose(expected, before, atol=1e-3)

    dynamo.reset()
    counter = Counter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        assert_close_fp32(compiled(input_ids=ids).logits, before)
        hotswap_adapter(model, tmp_path / "other")
        assert_close_fp32(compiled(input_ids=ids).logits, expected)
        hotswap_adapter(model, adapter_state_dict(copy.deepcopy(model)))  # a state dict
        assert_close_fp32(compiled(input_ids=ids).logits, expected)
    assert counter.graphs == 1


def test_a_hotswap_of_another_rank_is_refused_naming_the_ranks(tmp_path):
    model = _injected("llama")
    source, _ = _llama()
    inject_lora(source, LoRAConfig(r=4, target_modules="all-linear"))
    save_adapter(source, tmp_path / "r4")
    snapshot = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    with pytest.raises(AdapterLoadError, match=r"rank 4 in the source, 2 in the model"):
        hotswap_adapter(model, tmp_path / "r4")
    for key, value in adapter_state_dict(model).items():
        assert torch.equal(value, snapshot[key])


def test_set_adapter_compiles_one_graph_per_adapter_and_reuses_it():
    """Reference for the hot swap: each newly active adapter costs one graph (cached)."""
    model = _injected("llama", ("default", "other")).eval()
    ids = _ids()
    dynamo.reset()
    counter = Counter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        for name in ("default", "other", "default", "other"):
            set_adapter(model, name)
            assert_close_fp32(compiled(input_ids=ids).logits, model(input_ids=ids).logits)
    assert counter.graphs == 2
