"""Many adapters on a GPU (issue 22, item 2): a Llama-shaped 1.1B model (TinyLlama's shape,
random weights, bf16), 16 adapters r=16 on q_proj and v_proj, one adapter per sequence.

Side by side in interleaved rounds (median of paired ratios), no grad:

- mixed   at 16 x 512, 64 x 128 and 64 x 1: ours (``per_sample_adapters``) vs PEFT
          (``adapter_names=``) vs the plain base model (targets: ours/base <= 1.15 at
          16 x 512, <= 1.3 at 64 x 1)
- single  one unmerged adapter (q,v r=16, and all-linear r=16) vs the base at 1 x 512 and
          64 x 1 (target <= 1.15 at 1 x 512)
- decode  ``generate()`` of 64 sequences, 32 new tokens with the KV cache, each sequence
          its own adapter vs the base model alone

Prints one JSON line per result and writes them to ``$OUT/bench_multi_gpu.json`` (or
``--out``). On a GPU machine (under 5 minutes)::

    python benchmarks/gpu/bench_multi_gpu.py

On CPU in seconds (what ``tests/test_bench_multi_gpu.py`` runs)::

    python benchmarks/gpu/bench_multi_gpu.py --device cpu --smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_multi import peft_with  # noqa: E402

from lora_lightning import LoRAConfig, inject_lora, per_sample_adapters, set_adapter  # noqa: E402

QV = ["q_proj", "v_proj"]
RESULTS: list[dict] = []


def emit(**row) -> None:
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def interleave(fns: dict, rounds: int, dev: torch.device) -> tuple[dict, dict]:
    """Median ms per variant and the median paired ratio of each variant to ``base``."""
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            sync(dev)
            t0 = time.perf_counter()
            fns[n]()
            sync(dev)
            times[n].append(time.perf_counter() - t0)
    med = {n: 1e3 * statistics.median(t) for n, t in times.items()}
    over = {f"{n}/base": statistics.median(a / b for a, b in zip(t, times["base"], strict=True))
            for n, t in times.items() if n != "base"}
    return med, over


def llama(smoke: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    if smoke:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                          max_position_embeddings=1024)
    else:  # TinyLlama-1.1B's shape
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                          num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                          max_position_embeddings=2048)
    torch.manual_seed(0)
    return cfg, LlamaForCausalLM(cfg).eval()


def with_adapters(base, n: int, targets, seed: int = 1):
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        inject_lora(model, LoRAConfig(r=16, alpha=32, target_modules=targets), adapter=f"a{i}")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.02)
    return model.eval()


def peft_like(base, ours, n: int):
    """PEFT's model with ours' adapter values (None if peft is missing)."""
    try:
        import peft  # noqa: F401
    except ImportError:
        return None
    return peft_with(base, n, ours, QV, r=16)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny model and shapes (seconds)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    RESULTS.clear()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rounds = 2 if args.smoke else args.rounds
    k = 4 if args.smoke else args.adapters
    cfg, base = llama(args.smoke)
    ours = with_adapters(base, k, QV)
    theirs = peft_like(base, ours, k)
    single = with_adapters(base, 1, "all-linear", seed=2)
    models = [m for m in (base, ours, theirs, single) if m is not None]
    for m in models:
        m.to(dev, dtype)
    names = [f"a{i}" for i in range(k)]
    emit(section="setup", device=str(dev), dtype=str(dtype), torch=torch.__version__,
         gpu=torch.cuda.get_device_name() if dev.type == "cuda" else None, adapters=k,
         peft=theirs is not None)

    def forward(model, ids, **kw):
        def go():
            with torch.no_grad():
                model(input_ids=ids, **kw)
        return go

    mixed_shapes = [(8, 16), (8, 1)] if args.smoke else [(16, 512), (64, 128), (64, 1)]
    for b, t in mixed_shapes:
        ids = torch.randint(0, cfg.vocab_size, (b, t), device=dev)
        per = [names[i % k] for i in range(b)]

        def mixed(ids=ids, per=per):
            with torch.no_grad(), per_sample_adapters(ours, per):
                ours(input_ids=ids)

        fns = {"ours": mixed, "base": forward(base, ids)}
        if theirs is not None:
            fns["peft"] = forward(theirs, ids, adapter_names=per)
        med, over = interleave(fns, rounds, dev)
        emit(section="mixed", shape=f"{b}x{t}", ms=med, **over)

    set_adapter(ours, "a0")
    single_shapes = [(1, 16), (8, 1)] if args.smoke else [(1, 512), (64, 1)]
    for b, t in single_shapes:
        ids = torch.randint(0, cfg.vocab_size, (b, t), device=dev)
        fns = {"ours_qv": forward(ours, ids), "ours_all_linear": forward(single, ids),
               "base": forward(base, ids)}
        if theirs is not None:
            theirs.set_adapter("a0")
            fns["peft_qv"] = forward(theirs, ids)
        med, over = interleave(fns, rounds, dev)
        emit(section="single", shape=f"{b}x{t}", ms=med, **over)

    b, t, new = (8, 8, 4) if args.smoke else (64, 32, 32)
    ids = torch.randint(0, cfg.vocab_size, (b, t), device=dev)
    per = [names[i % k] for i in range(b)]
    gen = {"do_sample": False, "max_new_tokens": new, "min_new_tokens": new,
           "pad_token_id": 0}

    def decode_mixed():
        with torch.no_grad(), per_sample_adapters(ours, per):
            ours.generate(input_ids=ids, **gen)

    def decode_base():
        with torch.no_grad():
            base.generate(input_ids=ids, **gen)

    med, over = interleave({"ours": decode_mixed, "base": decode_base}, max(2, rounds // 3),
                           dev)
    emit(section="decode", shape=f"{b}x{t}+{new}", ms=med, **over)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_multi_gpu.json").write_text(json.dumps(RESULTS, indent=1))
    return RESULTS


if __name__ == "__main__":
    main()
