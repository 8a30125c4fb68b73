#!/usr/bin/env python3
"""Issue 20's GPU table in one command: a LoRA training step against full fine-tuning and
PEFT on a Llama-shaped 1.1B model, eager and compiled, with peak memory.

On one GPU (bf16 base, bf16 autocast, AdamW, 8 x 1024 tokens, r=16, float32 adapters for
both libraries, interleaved rounds, median of paired ratios), in under 5 minutes::

    python benchmarks/gpu/bench_gpu.py --out /tmp/out

On a CPU, a seconds-long smoke run of the same code (a tiny model, one round, the compiled
section with the ``eager`` backend)::

    python benchmarks/gpu/bench_gpu.py --device cpu --smoke

Sections (``--sections``): ``train`` (full, ours and PEFT on q,v and all-linear, and ours
and full with activation checkpointing: step time, paired ratios, step peak memory above
what is live at step start), ``compile`` (full, ours and PEFT all-linear under
``torch.compile`` on ``--compile-layers`` layers), ``profile`` (``aten::mm`` calls per step,
ours all-linear vs full). Prints one JSON line per result, then a markdown table; writes
``bench_gpu.json`` and ``bench_gpu.md`` to ``--out``. Based on the scripts that measured
the issue (``../shared/gpu/gpu_bench.py``, ``gpu_bench2.py``, ``gpu_profile.py``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

QV = ["q_proj", "v_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Bench:
    """Results (JSON lines) of one run on one device."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.results: list[dict] = []

    def emit(self, **kw) -> None:
        self.results.append(kw)
        print(json.dumps(kw), flush=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- models ---------------------------------------------------------------------------
    def llama(self, layers: int | None = None):
        from transformers import LlamaConfig, LlamaForCausalLM

        if self.args.smoke:
            cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                              max_position_embeddings=256)
        else:  # TinyLlama-1.1B's shape
            cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                              num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                              max_position_embeddings=2048)
        if layers:
            cfg.num_hidden_layers = layers
        cfg.use_cache = False
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        return cfg, LlamaForCausalLM(cfg).to(self.device, dtype)

    def ours(self, base, targets):
        import lora_lightning as ll

        m = copy.deepcopy(base)
        r = self.args.r
        ll.inject_lora(m, ll.LoRAConfig(r=r, alpha=2 * r, target_modules=targets))
        return m

    def peft(self, base, targets):
        import peft

        r = self.args.r
        return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets))

    def batch(self, cfg):
        b, t = (2, 32) if self.args.smoke else (self.args.batch, self.args.seq)
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, cfg.vocab_size, (b, t), generator=g).to(self.device)

    def step_fn(self, model, ids) -> Callable[[], None]:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=self.device.type == "cuda")
        autocast = self.device.type == "cuda"

        def step() -> None:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    # -- measurement ----------------------------------------------------------------------
    def interleave(self, fns: dict[str, Callable[[], None]]) -> dict[str, list[float]]:
        """Seconds per call over rounds of one call each, the first one rotating."""
        names = list(fns)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(self.args.rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                self.sync()
                t0 = time.perf_counter()
                fns[n]()
                self.sync()
                times[n].append(time.perf_counter() - t0)
        return times

    def peak_mib(self, fn: Callable[[], None]) -> float | None:
        """Peak allocated memory of one call above what was allocated before it (GPU)."""
        if self.device.type != "cuda":
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        self.sync()
        return (torch.cuda.max_memory_allocated() - start) / 2**20


def paired(times: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def section_train(bench: Bench) -> None:
    cfg, base = bench.llama()
    ids = bench.batch(cfg)
    models = {"full": copy.deepcopy(base)}
    for tag, targets in (("qv", QV), ("all", ALL)):
        models[f"ours_{tag}"] = bench.ours(base, targets)
        models[f"peft_{tag}"] = bench.peft(base, targets)
    for k in ("full", "ours_all"):
        m = copy.deepcopy(models[k])
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        models[f"{k}_ckpt"] = m
    del base
    bench.free()
    fns = {}
    for k, m in models.items():
        m.train()
        fns[k] = bench.step_fn(m, ids)
        fns[k]()  # warm-up (and the optimizer's state)
    peaks = {k: bench.peak_mib(f) for k, f in fns.items()}
    times = bench.interleave(fns)
    tokens = ids.numel()
    for k, m in models.items():
        ms = statistics.median(times[k]) * 1e3
        dtypes = sorted({str(p.dtype) for p in m.parameters() if p.requires_grad})
        bench.emit(section="train", variant=k, ms=ms, tokens_per_s=tokens / ms * 1e3,
                   step_peak_mib=peaks[k], trainable_dtypes=dtypes)
    for what, a, b in (("ours/full q,v", "ours_qv", "full"),
                       ("ours/full all-linear", "ours_all", "full"),
                       ("peft/full q,v", "peft_qv", "full"),
                       ("peft/full all-linear", "peft_all", "full"),
                       ("ours/peft q,v", "ours_qv", "peft_qv"),
                       ("ours/peft all-linear", "ours_all", "peft_all"),
                       ("ours/full all-linear, both checkpointed", "ours_all_ckpt", "full_ckpt"),
                       ("ours checkpointed/not, all-linear", "ours_all_ckpt", "ours_all")):
        peak = None
        if peaks[a] is not None and peaks[b]:
            peak = peaks[a] / peaks[b]
        bench.emit(section="train_ratio", what=what, step=paired(times, a, b),
                   peak_memory=peak)


def section_compile(bench: Bench) -> None:
    cfg, base = bench.llama(bench.args.compile_layers)
    ids = bench.batch(cfg)
    models = {"full": copy.deepcopy(base), "ours_all": bench.ours(base, ALL),
              "peft_all": bench.peft(base, ALL)}
    del base
    backend = "eager" if bench.args.smoke else "inductor"
    fns = {}
    for k, m in models.items():
        m.train()
        fns[k] = bench.step_fn(torch.compile(m, backend=backend), ids)
        t0 = time.perf_counter()
        fns[k]()
        fns[k]()
        bench.sync()
        bench.emit(section="compile_warm", variant=k, seconds=round(time.perf_counter() - t0, 1))
    times = bench.interleave(fns)
    for k in models:
        bench.emit(section="compile", variant=k, ms=statistics.median(times[k]) * 1e3)
    bench.emit(section="compile_ratio", ours_over_peft=paired(times, "ours_all", "peft_all"),
               ours_over_full=paired(times, "ours_all", "full"),
               peft_over_full=paired(times, "peft_all", "full"))


def section_profile(bench: Bench) -> None:
    from torch.profiler import ProfilerActivity, profile

    cfg, base = bench.llama()
    ids = bench.batch(cfg)
    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
    for name, model in (("ours_all", bench.ours(base, ALL)), ("full", base)):
        model.train()
        step = bench.step_fn(model, ids)
        step()
        bench.sync()
        with profile(activities=activities) as prof:
            step()
            bench.sync()
        counts = {e.key: e.count for e in prof.key_averages()
                  if e.key in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::copy_",
                               "aten::to", "aten::mul", "aten::add_")}
        bench.emit(section="profile", variant=name, calls_per_step=counts)
        del model, step


SECTIONS = {"train": section_train, "compile": section_compile, "profile": section_profile}


def table(results: Sequence[dict]) -> str:
    """The issue's table from the results: step-time and peak-memory ratios."""
    lines = ["| measurement | step time | peak memory |", "|---|---:|---:|"]
    for r in results:
        if r.get("section") == "train_ratio":
            peak = "n/a" if r["peak_memory"] is None else f"{r['peak_memory']:.3f}"
            lines.append(f"| {r['what']} | {r['step']:.3f} | {peak} |")
        elif r.get("section") == "compile_ratio":
            for key in ("ours_over_peft", "ours_over_full", "peft_over_full"):
                lines.append(f"| compiled {key.replace('_over_', '/')} all-linear "
                             f"| {r[key]:.3f} | |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 1 round (seconds)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=None, help="default 6, 1 with --smoke")
    ap.add_argument("--compile-layers", type=int, default=4,
                    help="layers of the compiled model (compile time grows with depth)")
    ap.add_argument("--sections", default="train,compile,profile")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (1 if args.smoke else 6)
    unknown = [s for s in args.sections.split(",") if s not in SECTIONS]
    if unknown:
        ap.error(f"--sections: unknown {unknown}; expected names from {list(SECTIONS)}")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    bench = Bench(args)
    import peft
    import transformers

    bench.emit(section="env", torch=torch.__version__, peft=peft.__version__,
               transformers=transformers.__version__, device=(
                   torch.cuda.get_device_name() if bench.device.type == "cuda" else "cpu"),
               command=" ".join(["python benchmarks/gpu/bench_gpu.py",
                                 *(sys.argv[1:] if argv is None else argv)]))
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            SECTIONS[name](bench)
            bench.emit(section=f"{name}_done", seconds=round(time.perf_counter() - t0, 1))
        except Exception as err:  # report it and go on with the next section
            bench.emit(section=f"{name}_failed", error=repr(err)[:600],
                       tb=traceback.format_exc()[-1500:])
        bench.free()
    text = table(bench.results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_gpu.json").write_text(json.dumps(bench.results, indent=1))
    (args.out / "bench_gpu.md").write_text(text)
    return bench.results


if __name__ == "__main__":
    main()
