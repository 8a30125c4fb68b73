"""Inference of this checkout against an older commit's core, side by side in one process:
a per-sample mixed batch (MiniLM, 64 x 32 tokens, 4 and 16 adapters, r=8 on query, value)
and one unmerged all-linear adapter (12 x Linear(512), 64 x 128), each against the plain
base model too. Interleaved rounds, medians of per-round ratios (as bench_lora.py).

The older core is extracted with ``git archive`` into a temporary folder and imported as
``lora_lightning_old`` (the core uses relative imports only, so the copy is self-contained).

    python benchmarks/bench_versions.py --old 93a084c --rounds 15
    python benchmarks/bench_versions.py --old a470446 --only llama   # bench_multi's Llama

``--only llama`` runs one unmerged all-linear r=16 adapter on ``bench_multi``'s Llama-shaped
model (d=512, 4 layers) at 16 x 64 and 64 x 1 instead (issue 22's single-adapter shapes).
"""
import argparse
import copy
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import lora_lightning as new

sys.path.insert(0, str(Path(__file__).parent))
from bench_multi import interleaved, llama, minilm  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--old", default="93a084c", help="the commit to compare against")
parser.add_argument("--rounds", type=int, default=15)
parser.add_argument("--only", choices=["minilm", "llama"], default="minilm",
                    help="the MiniLM items (default) or the Llama single adapter")
args = parser.parse_args()
root = Path(__file__).resolve().parents[1]
tmp = Path(tempfile.mkdtemp())
archive = subprocess.run(["git", "-C", str(root), "archive", args.old, "lora_lightning"],
                         check=True, capture_output=True).stdout
subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
(tmp / "lora_lightning").rename(tmp / "lora_lightning_old")
sys.path.insert(0, str(tmp))
import lora_lightning_old as old  # noqa: E402

torch.set_num_threads(1)
print(f"this checkout vs {args.old}: torch {torch.__version__}, 1 thread, {args.rounds} "
      "interleaved rounds; ratios are medians of per-round ratios\n\n"
      "| measurement | new / old | new / base | old / base | max abs new-old |\n"
      "|---|---:|---:|---:|---:|")

def ratio(times, a, b):
    return times[1][(a, b)]  # bench_multi.interleaved: (medians, per-round ratio medians)


def with_adapters(lib, base, n):
    model = copy.deepcopy(base)
    for i in range(n):
        lib.inject_lora(model, lib.LoRAConfig(r=8, alpha=16, target_modules=["query", "value"]),
                        adapter=f"a{i}")
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def mixed(lib, model, names, ids, mask):
    def call():
        with torch.inference_mode(), lib.per_sample_adapters(model, names):
            return model(input_ids=ids, attention_mask=mask).last_hidden_state
    return call


def plain_forward(model, *inputs, **kwargs):
    def call():
        with torch.inference_mode():
            out = model(*inputs, **kwargs)
        return getattr(out, "last_hidden_state", out)
    return call


def single(lib, plain, r=8):
    model = copy.deepcopy(plain)
    lib.inject_lora(model, lib.LoRAConfig(r=r, alpha=2 * r, target_modules="all-linear"))
    g = torch.Generator().manual_seed(1)  # the same adapter values for both versions
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def compare(variants, label, rounds):
    diff = (variants["new"]() - variants["old"]()).abs().max().item()
    t = interleaved(variants, rounds)
    print(f"| {label} | {ratio(t, 'new', 'old'):.3f} | {ratio(t, 'new', 'base'):.3f} | "
          f"{ratio(t, 'old', 'base'):.3f} | {diff:.1e} |", flush=True)


if args.only == "llama":
    plain = llama()
    s_new, s_old = single(new, plain, r=16), single(old, plain, r=16)
    for batch, tokens in ((16, 64), (64, 1)):
        ids = torch.randint(0, 1000, (batch, tokens), generator=torch.Generator().manual_seed(1))
        compare({"new": plain_forward(s_new, input_ids=ids),
                 "old": plain_forward(s_old, input_ids=ids),
                 "base": plain_forward(plain, input_ids=ids)},
                f"unmerged all-linear r=16, Llama d=512 x4, {batch}x{tokens}", 2 * args.rounds)
    sys.exit(0)

base = minilm()
ids = torch.randint(0, 30000, (64, 32), generator=torch.Generator().manual_seed(0))
mask = torch.ones_like(ids)
for n in (4, 16):
    m_new, m_old = with_adapters(new, base, n), with_adapters(old, base, n)
    names = [f"a{i % n}" for i in range(64)]
    variants = {"new": mixed(new, m_new, names, ids, mask),
                "old": mixed(old, m_old, names, ids, mask),
                "base": plain_forward(base, input_ids=ids, attention_mask=mask)}
    diff = (variants["new"]() - variants["old"]()).abs().max().item()
    t = interleaved(variants, args.rounds)
    print(f"| mixed batch 64x32, {n} adapters | {ratio(t, 'new', 'old'):.3f} | "
          f"{ratio(t, 'new', 'base'):.3f} | {ratio(t, 'old', 'base'):.3f} | {diff:.1e} |",
          flush=True)
torch.manual_seed(0)
plain = nn.Sequential(*[nn.Linear(512, 512) for _ in range(12)]).eval()
x = torch.randn(64, 128, 512)
s_new, s_old = single(new, plain), single(old, plain)
variants = {"new": plain_forward(s_new, x), "old": plain_forward(s_old, x),
            "base": plain_forward(plain, x)}
diff = (variants["new"]() - variants["old"]()).abs().max().item()
t = interleaved(variants, 2 * args.rounds)
print(f"| unmerged single adapter, 12 x Linear(512), 64x128 | {ratio(t, 'new', 'old'):.3f} | "
      f"{ratio(t, 'new', 'base'):.3f} | {ratio(t, 'old', 'base'):.3f} | {diff:.1e} |",
      flush=True)
