"""What a LoRA training step keeps for backward and copies, against full fine-tuning and PEFT.

For a small Llama-shaped model (HF ``LlamaForCausalLM`` from a config, d=256, 2 layers,
4 x 128 tokens, r=8 on all seven projections) and each base precision (float32, float32
under bf16 autocast, bfloat16 with float32 adapters, bfloat16 under autocast), one
training step of: full fine-tuning, ours with the plain ops (the one-node Linear path
off), ours (the default) and PEFT. Columns: bytes saved for backward
(``saved_tensors_hooks``, each storage once, parameters excluded), activation-sized
``aten::copy_`` calls (casts and copies of at least rows x d elements) and GEMM calls
(``mm``, ``addmm``, ``addmm_``), from ``torch.profiler``. Counts, not times: the same on
any machine, so it runs without the benchmark lock (about 20 s).

    python benchmarks/bench_activations.py [--tiny]
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence

import torch

from lora_lightning import LoRAConfig, inject_lora, lora_layers

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETTINGS = {  # label -> (base dtype, autocast)
    "float32": (torch.float32, False),
    "float32, bf16 autocast": (torch.float32, True),
    "bfloat16 (bf16-true), float32 adapters": (torch.bfloat16, False),
    "bfloat16, bf16 autocast, float32 adapters": (torch.bfloat16, True),
}


def variants(base: torch.nn.Module) -> dict[str, torch.nn.Module]:
    import peft

    out = {"full": copy.deepcopy(base)}
    for name in ("ours, plain ops", "ours"):
        m = copy.deepcopy(base)
        inject_lora(m, LoRAConfig(r=8, alpha=16, target_modules=ALL))
        out[name] = m
    for layer in lora_layers(out["ours, plain ops"]).values():
        layer.can_fuse = False
    out["PEFT"] = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=ALL))
    return out


def measure(model: torch.nn.Module, ids: torch.Tensor, autocast: bool, d: int
            ) -> tuple[float, int, int]:
    """(MiB saved for backward, activation-sized copies, GEMM calls) of one step."""
    from torch.profiler import profile

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    with profile(record_shapes=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step()
    big = ids.numel() * d
    copies = gemms = 0
    for e in prof.events():
        if e.name == "aten::copy_" and e.input_shapes and e.input_shapes[0]:
            copies += int(torch.Size(e.input_shapes[0]).numel() >= big)
        gemms += e.name in ("aten::mm", "aten::addmm", "aten::addmm_")
    return sum(saved.values()) / 2**20, copies, gemms


def main(argv: Sequence[str] | None = None) -> list[tuple]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="d=32, 1 layer (the smoke test)")
    args = ap.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    d, ffn, layers, heads, kv, rows = (32, 64, 1, 2, 1, (2, 16)) if args.tiny else (
        256, 688, 2, 8, 4, (4, 128))
    cfg = LlamaConfig(hidden_size=d, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=1024,
                      use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    ids = torch.randint(0, 1024, rows, generator=torch.Generator().manual_seed(0))
    torch.set_num_threads(1)
    rows_out = []
    print("| base, precision | variant | saved for backward MiB | activation-sized copies "
          "| GEMM calls |\n|---|---|---:|---:|---:|")
    for label, (dtype, autocast) in SETTINGS.items():
        torch.manual_seed(0)
        base = LlamaForCausalLM(cfg).to(dtype)
        for name, model in variants(base).items():
            mib, copies, gemms = measure(model.train(), ids, autocast, d)
            rows_out.append((label, name, mib, copies, gemms))
            print(f"| {label} | {name} | {mib:.1f} | {copies} | {gemms} |")
    return rows_out


if __name__ == "__main__":
    main()
