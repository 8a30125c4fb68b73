"""Which no-grad forward of one unmerged adapter is faster, by rows: the fold or the
adapter path. This is the measurement behind ``FOLD_MIN_ROWS`` in
``lora_lightning/layers/base.py``.

For a ``LoRALinear`` (r=16) with one plain adapter, under ``torch.no_grad``, it times, in
interleaved rounds (one call of each per round; ratios are medians of per-round ratios, as
``bench_lora.py`` does):

* ``fold``: ``folded_forward`` with ``W + s·B·A`` built for the call (one matmul after a
  d·k·r product and a weight-sized add and cast);
* ``adapter``: the base matmul plus two skinny ones, added in place (``_add_in_place``,
  the path autograd uses);
* ``base``: the plain ``nn.Linear`` forward, the reference both are divided by.

    python benchmarks/bench_forward_paths.py --out benchmarks/forward_paths.md   # ~2 min
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_lora.py

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lora_lightning import LoRAConfig, inject_lora  # noqa: E402
from lora_lightning.layers.base import FOLD_MIN_ROWS  # noqa: E402

SHAPES = [(512, 512), (512, 1536), (2048, 2048)]
ROWS = [1, 64, 512, 2048, 4096, 8192, 16384]


def measure(d_in: int, d_out: int, rows: int, rounds: int) -> tuple[float, float]:
    """(fold / base, adapter / base): medians of per-round ratios."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out))
    inject_lora(model, LoRAConfig(r=16, alpha=32, target_modules=["0"]))
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(rows, d_in)
    calls = {
        "fold": lambda: layer.folded_forward(x, layer.out_first(layer.combined_weight(
            ["default"]))),
        "adapter": lambda: layer._add_in_place(x, "default"),
        "base": lambda: layer.base_forward(x),
    }
    reps = max(1, 2**27 // (rows * d_in * d_out))  # about the same base work per shape
    times: dict[str, list[float]] = {k: [] for k in calls}
    with torch.no_grad():
        for fn in calls.values():
            fn()
        names = list(calls)
        for i in range(rounds):
            for name in names[i % 3:] + names[:i % 3]:
                start = time.perf_counter()
                for _ in range(reps):
                    calls[name]()
                times[name].append(time.perf_counter() - start)
    ratio = {k: statistics.median(a / b for a, b in zip(times[k], times["base"], strict=True))
             for k in ("fold", "adapter")}
    return ratio["fold"], ratio["adapter"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        f"`python benchmarks/bench_forward_paths.py`: torch {torch.__version__}, "
        f"{args.threads} thread(s), {platform.processor() or platform.machine()}, "
        f"{args.rounds} interleaved rounds; time / plain base forward (median of per-round "
        f"ratios); FOLD_MIN_ROWS = {FOLD_MIN_ROWS:,}.",
        "",
        "| Linear | rows | fold / base | adapter path / base | faster |",
        "|---|---:|---:|---:|---|",
    ]
    print("\n".join(lines), flush=True)
    for d_in, d_out in SHAPES:
        for rows in ROWS:
            fold, adapter = measure(d_in, d_out, rows, args.rounds)
            line = (f"| {d_in}x{d_out} | {rows:,} | {fold:.3f} | {adapter:.3f} | "
                    f"{'fold' if fold < adapter else 'adapter'} |")
            lines.append(line)
            print(line, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
