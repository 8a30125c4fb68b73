"""How far a merged bf16 model's output drifts from the unmerged bf16 model's, measured.

Merging computes ``W + scale·B·A`` in float32 and casts to bf16 once, so the merged weight
carries one bf16 rounding (relative 2**-9 per element), while the unmerged layer rounds its
base and adapter outputs separately. Both are compared with a float64 reference computed
from the same bf16 parameters. Print the figures with::

    python tests/test_reliability_numerics.py

Related checks live elsewhere: 100 merge/unmerge round trips drift < 1e-5 in fp32
(``test_layers.py::test_repeated_merge_unmerge_does_not_drift``), bf16 merging happens in
fp32 and casts once (``test_layers.py::test_bf16_merges_in_fp32_and_casts_once``) and
``precision="bf16-mixed"`` keeps adapters float32
(``test_callback_compat.py::test_bf16_mixed_on_cpu_trains_with_float32_adapters``).
"""

from __future__ import annotations

import pytest
import torch
from _helpers import randomize_adapters
from torch import nn

from lora_lightning import LoRAConfig, inject_lora, merge_lora, unmerge_lora

# Documented bounds, about 2x the measured figures (see tests/README.md).
MAX_REL_LINEAR = 1.25e-2  # max |merged - unmerged| / max |reference|, one 384x384 layer
MAX_REL_MINILM = 1.5e-2  # same, MiniLM's last hidden states after 6 layers in bf16
RMS_REL_MINILM = 2.5e-2  # rms |merged - unmerged| / rms |reference| there


def _randomise_adapters(model: nn.Module, std: float, seed: int = 0) -> None:
    """Trained-looking adapters: B is no longer zero (A keeps its initial values)."""
    randomize_adapters(model, seed, std, select=lambda name, p: name.endswith("lora_B"))


def _stats(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    diff = (got.double() - want.double()).abs()
    return {"max_abs": diff.max().item(), "max_rel": (diff.max() / want.abs().max()).item(),
            "rms_rel": (diff.pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()}


def linear_drift(size: int = 384, r: int = 16, seed: int = 0) -> dict[str, dict[str, float]]:
    """One bf16 ``size x size`` Linear with a rank-``r`` adapter (update ~5% of W)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(size, size))
    # bf16 adapters too (adapter_dtype="base"): the bound is for an all-bf16 layer
    inject_lora(model, LoRAConfig(r=r, alpha=2 * r, target_modules=["0"], adapter_dtype="base"))
    _randomise_adapters(model, std=0.02, seed=seed)
    model.to(torch.bfloat16)
    layer = model[0]
    x = torch.randn(64, size, generator=torch.Generator().manual_seed(seed + 1)).bfloat16()
    with torch.no_grad():
        w = layer.weight.double() + layer.scaling * (layer.lora_B.double() @ layer.lora_A.double())
        reference = x.double() @ w.T + layer.bias.double()
        unmerged = model(x)
        naive = x @ (layer.weight + layer.scaling * (layer.lora_B @ layer.lora_A)).T + layer.bias
        merge_lora(model)
        merged = model(x)
        unmerge_lora(model)
    return {"merged_vs_unmerged": _stats(merged, unmerged),
            "merged_vs_fp64": _stats(merged, reference),
            "unmerged_vs_fp64": _stats(unmerged, reference),
            "bf16_merge_vs_fp64": _stats(naive, reference)}


def minilm_drift(seed: int = 0) -> dict[str, dict[str, float]]:
    """MiniLM (6 layers, hidden 384) with r=8 adapters on query and value, in bf16: its
    last hidden states (4 x 32 tokens x 384). The reference is the float64 model."""
    from lora_lightning.examples.classification.text import MiniLMClassifier

    torch.manual_seed(seed)
    model = MiniLMClassifier(num_classes=2, dropout=0.0)
    inject_lora(model, LoRAConfig(r=8, alpha=16, target_modules=["query", "value"],
                                  adapter_dtype="base"))  # an all-bf16 model, as measured
    _randomise_adapters(model, std=0.02, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    batch = {"input_ids": torch.randint(1000, 20000, (4, 32), generator=g),
             "attention_mask": torch.ones(4, 32, dtype=torch.long)}
    model.eval()

    def hidden():
        return model.encoder(**batch).last_hidden_state

    with torch.no_grad():
        model.double()
        reference = hidden()
        model.to(torch.bfloat16)
        unmerged = hidden()
        merge_lora(model)
        merged = hidden()
    return {"merged_vs_unmerged": _stats(merged, unmerged),
            "merged_vs_fp64": _stats(merged, reference),
            "unmerged_vs_fp64": _stats(unmerged, reference)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_merged_linear_stays_within_the_documented_bound(seed):
    figures = linear_drift(seed=seed)
    assert figures["merged_vs_unmerged"]["max_rel"] < MAX_REL_LINEAR, figures
    # Merging does not make the bf16 model less accurate than running it unmerged ...
    merged, unmerged = figures["merged_vs_fp64"], figures["unmerged_vs_fp64"]
    assert merged["rms_rel"] < 1.5 * unmerged["rms_rel"], figures
    # ... and is no worse than adding the update in bf16 (what merging in fp32 avoids).
    assert merged["rms_rel"] <= figures["bf16_merge_vs_fp64"]["rms_rel"] * 1.05, figures


def test_bf16_merged_minilm_stays_within_the_documented_bound():
    pytest.importorskip("transformers")
    figures = minilm_drift()
    assert figures["merged_vs_unmerged"]["max_rel"] < MAX_REL_MINILM, figures
    assert figures["merged_vs_unmerged"]["rms_rel"] < RMS_REL_MINILM, figures
    assert figures["merged_vs_fp64"]["rms_rel"] < 1.5 * figures["unmerged_vs_fp64"]["rms_rel"]


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name, figures in [*((f"linear 384x384 r=16 seed {s}", linear_drift(seed=s))
                            for s in range(3)), ("MiniLM q,v r=8", minilm_drift())]:
        print(name)
        for pair, stats in figures.items():
            print(f"  {pair:<20} " + "  ".join(f"{k} {v:.2e}" for k, v in stats.items()))
