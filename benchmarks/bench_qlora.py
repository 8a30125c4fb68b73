"""Side-by-side benchmark: QLoRA here vs PEFT's QLoRA on the same bitsandbytes base, with
float32 LoRA as the memory reference.

One process, a Llama-shaped causal LM built from a config (random weights, nothing
downloaded), LoRA r=16 on every linear layer of the decoder (q, k, v, o, gate, up, down).
Variants, each a trainable copy of the same base:

- ``lora``: our LoRA on the dense float32 base;
- ``qlora``: ours with ``LoRAConfig(quantize_base="nf4")`` (each adapted Linear becomes a
  bitsandbytes ``Linear4bit``, NF4 with double quantization, computing in float32);
- ``peft``: PEFT's LoRA on the same ``Linear4bit`` layers (the same quantized bytes; PEFT's
  own ``lora.bnb.Linear4bit`` wrapper), with the same config.

Measured:

- step time: forward + backward + ``AdamW.step`` over the trainable tensors, timed in
  interleaved rounds (one step per variant per round, the first one rotating), after
  warm-up; ratios are medians over rounds of the ratio within a round;
- bytes of the adapted layers' frozen weights (a 4-bit weight: its packed bytes plus its
  quantization state);
- peak memory of one training step: on CPU, the live tensor bytes before the step
  (parameters, buffers, optimizer state, batch) plus the peak the allocator reached during
  it (``torch.profiler``, as ``bench_lora.py``); on CUDA, ``max_memory_allocated``;
- that ours and PEFT compute the same loss on the same base and adapters (QLoRA only).

``python benchmarks/bench_qlora.py`` takes about a minute on one CPU core;
``--preset tiny`` a few seconds (the smoke test); ``--preset smollm2`` runs the same on
SmolLM2-135M-Instruct itself (``make lm`` installs it; random tokens, batch 8 x 128) with
the tensor memory of one step split into weights, gradients, optimizer state and
activations. Results: ``benchmarks/qlora.md``.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_lora.py

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import _storage, paired_ratio, profiled_step  # noqa: E402

from lora_lightning import LoRAConfig, inject_lora, lora_layers  # noqa: E402

MiB = 2**20
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRESETS = {
    # hidden, intermediate, layers, heads, kv heads, vocab, batch, seq, warmup, steps
    "tiny": (64, 128, 1, 4, 2, 128, 2, 16, 1, 2),
    "cpu": (512, 1536, 4, 8, 4, 2048, 4, 128, 2, 8),
    "gpu": (2048, 5632, 8, 16, 4, 32000, 8, 512, 3, 15),
    # SmolLM2-135M-Instruct itself (make lm installs it), Hamlet, batch 8 x 128 as in
    # experiment=lm_lora; the first six fields come from the model
    "smollm2": (None, None, None, None, None, None, 8, 128, 1, 2),
}


@dataclass
class Variant:
    name: str
    net: nn.Module
    opt: torch.optim.Optimizer
    frozen_linear_bytes: int
    step_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    static_bytes: int = 0
    loss: float = 0.0
    split: dict[str, int] = field(default_factory=dict)
    """weights / grads / optimizer / activations bytes of the measured step (CPU)."""


def build_base(preset: tuple, device: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset[0] is None:
        from lora_lightning.examples import load_causal_lm

        lm = load_causal_lm(None)
        lm.config.use_cache = False
        return lm.to(device)
    hidden, inter, layers, heads, kv, vocab = preset[:6]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device)


def lora_config(kind: str | None) -> LoRAConfig:
    return LoRAConfig(r=16, alpha=32, target_modules=TARGETS, quantize_base=kind)


def quantized_copy(base: nn.Module) -> nn.Module:
    """``base`` with every target Linear replaced by the same NF4 ``Linear4bit`` that
    ``quantize_base="nf4"`` makes (for PEFT, which takes a model already quantized)."""
    from lora_lightning.quantize import quantize_linear

    net = copy.deepcopy(base)
    for name, module in list(net.named_modules()):
        if name.rsplit(".", 1)[-1] in TARGETS:
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, quantize_linear(module, "nf4"))
    net.is_loaded_in_4bit = True  # what transformers sets; PEFT picks its bnb layers by it
    return net


def frozen_linear_bytes(net: nn.Module) -> int:
    """Bytes of the target layers' frozen weights, quantization state included."""
    total = 0
    for name, module in net.named_modules():
        if name.rsplit(".", 1)[-1] not in TARGETS:
            continue
        module = getattr(module, "base_layer", module)  # PEFT's wrapper holds it there
        state = {}
        module._save_to_state_dict(state, "", keep_vars=True)
        total += sum(t.numel() * t.element_size() for k, t in state.items()
                     if isinstance(t, torch.Tensor) and (k == "weight" or k.startswith("weight.")))
    return total


def make_variants(base: nn.Module) -> list[Variant]:
    import peft

    out = []
    dense = copy.deepcopy(base)
    inject_lora(dense, lora_config(None))
    qlora = copy.deepcopy(base)
    inject_lora(qlora, lora_config("nf4"))
    theirs = peft.get_peft_model(quantized_copy(base), peft.LoraConfig(
        r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0))
    # the same adapter values on both QLoRA variants, so their losses must agree
    ours_layers = lora_layers(qlora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in ours_layers.items():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.01)
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    for name, net in (("lora", dense), ("qlora", qlora), ("peft", theirs)):
        params = [p for p in net.parameters() if p.requires_grad]
        out.append(Variant(name, net, torch.optim.AdamW(params, lr=1e-4),
                           frozen_linear_bytes(net)))
    return out


def train_step(v: Variant, ids: torch.Tensor) -> float:
    v.opt.zero_grad(set_to_none=True)
    logits = v.net(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    v.opt.step()
    return float(loss)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(variants: Sequence[Variant], ids: torch.Tensor, warmup: int,
                     steps: int, device: str) -> None:
    for _ in range(warmup):
        for v in variants:
            train_step(v, ids)
    gc.collect()
    for i in range(steps):
        for j in range(len(variants)):
            v = variants[(i + j) % len(variants)]
            _sync(device)
            gc.disable()
            t0 = time.perf_counter()
            train_step(v, ids)
            _sync(device)
            v.step_s.append(time.perf_counter() - t0)
            gc.enable()


def _live_bytes(v: Variant, ids: torch.Tensor) -> int:
    tensors = [*v.net.parameters(), *v.net.buffers(), ids]
    for state in v.opt.state.values():
        tensors += [t for t in state.values() if isinstance(t, torch.Tensor)]
    storages = {_storage(t) for t in tensors}
    return sum(n for _, n in storages)


def measure_memory(v: Variant, ids: torch.Tensor, device: str) -> None:
    """Peak tensor bytes of one training step (see the module docstring)."""
    v.opt.zero_grad(set_to_none=True)
    v.static_bytes = _live_bytes(v, ids)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        v.loss = train_step(v, ids)
        torch.cuda.synchronize()
        v.peak_bytes = v.static_bytes + torch.cuda.max_memory_allocated() - base
        return
    weights = {_storage(t) for t in [*v.net.parameters(), *v.net.buffers()]}
    weights |= {_storage(t) for t in _quant_state(v.net)}
    v.loss, peak, activations = profiled_step(lambda: train_step(v, ids),
                                              {ptr for ptr, _ in weights})
    v.peak_bytes = None if peak is None else v.static_bytes + peak
    grads = {_storage(p.grad) for p in v.net.parameters() if p.grad is not None}
    state = {_storage(t) for s in v.opt.state.values() for t in s.values()
             if isinstance(t, torch.Tensor)}
    v.split = {"weights": sum(n for _, n in weights), "grads": sum(n for _, n in grads),
               "optimizer": sum(n for _, n in state), "activations": activations}


def _quant_state(net: nn.Module) -> list[torch.Tensor]:
    """The tensors of bitsandbytes' quantization state (absmax, code, nested ones)."""
    out = []
    for m in net.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None and hasattr(qs, "as_dict"):
            out += [t for t in qs.as_dict(packed=True).values() if isinstance(t, torch.Tensor)]
    return out


def report(variants: list[Variant], preset: str, device: str, command: str) -> str:
    by = {v.name: v for v in variants}
    lines = [f"QLoRA benchmark, preset {preset!r} on {device} (`{command}`)", "",
             "| variant | step (median s) | frozen linear weights (MiB) | peak step memory (MiB) "
             "| loss of the measured step |", "|---|---|---|---|---|"]
    for v in variants:
        peak = "n/a" if v.peak_bytes is None else f"{v.peak_bytes / MiB:.1f}"
        lines.append(f"| {v.name} | {statistics.median(v.step_s):.4f} | "
                     f"{v.frozen_linear_bytes / MiB:.2f} | {peak} | {v.loss:.5f} |")
    if all(v.split for v in variants):
        lines += ["", "Tensor memory of the measured step (MiB; each storage counted once; "
                  "activations: what autograd saves for backward, weights excluded):", "",
                  "| variant | weights | grads | optimizer | activations | sum |",
                  "|---|---|---|---|---|---|"]
        for v in variants:
            parts = [v.split[k] / MiB for k in ("weights", "grads", "optimizer", "activations")]
            lines.append(f"| {v.name} | " + " | ".join(f"{p:.1f}" for p in parts)
                         + f" | {sum(parts):.1f} |")
    lines += ["", "Ratios (step time: median over rounds of the ratio within a round):", ""]
    lines.append(f"- step time qlora / peft: "
                 f"{paired_ratio(by['qlora'].step_s, by['peft'].step_s):.3f}")
    lines.append(f"- step time qlora / lora: "
                 f"{paired_ratio(by['qlora'].step_s, by['lora'].step_s):.3f}")
    lines.append(f"- frozen linear weights lora / qlora: "
                 f"{by['lora'].frozen_linear_bytes / by['qlora'].frozen_linear_bytes:.2f}x")
    if all(v.peak_bytes for v in variants):
        lines.append(f"- peak memory qlora / peft: "
                     f"{by['qlora'].peak_bytes / by['peft'].peak_bytes:.3f}")
        lines.append(f"- peak memory qlora / lora: "
                     f"{by['qlora'].peak_bytes / by['lora'].peak_bytes:.3f}")
    lines.append(f"- |loss qlora - loss peft| on the same base and adapters: "
                 f"{abs(by['qlora'].loss - by['peft'].loss):.2e}")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--steps", type=int, default=None, help="timed rounds")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        text = ("SKIPPED: bench_qlora needs bitsandbytes (pip install "
                "'lora-lightning[qlora]'); nothing was measured.\n")
        print(text, end="")
        return text
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    batch, seq, warmup, steps = preset[6:]
    steps = args.steps or steps
    base = build_base(preset, args.device)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    variants = make_variants(base)
    del base
    for v in variants:
        measure_memory(v, ids, args.device)
    time_interleaved(variants, ids, warmup, steps, args.device)
    command = " ".join(["python", "benchmarks/bench_qlora.py", *(argv or sys.argv[1:])])
    text = report(variants, args.preset, args.device, command)
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
