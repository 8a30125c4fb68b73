"""QLoRA vs PEFT's QLoRA on one GPU: ``benchmarks/bench_qlora.py`` with its ``gpu`` preset
(a Llama-shaped 0.5B model from a config, r=16 on every decoder linear, batch 8 x 512),
in one command, in about 2 minutes on an H200.

    python benchmarks/gpu/bench_qlora_gpu.py                    # on the GPU
    python benchmarks/gpu/bench_qlora_gpu.py --device cpu --smoke   # seconds, on CPU

It needs bitsandbytes (``pip install 'lora-lightning[qlora]'``, with its CUDA build): the
machine our GPU figures come from has none, so there the script says so and exits 0
without measuring anything. Figures: pending (``benchmarks/qlora.md``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--smoke", action="store_true", help="the tiny preset (seconds)")
    ap.add_argument("--out", default=None, help="also write the report here")
    args = ap.parse_args(argv)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        text = ("SKIPPED: bench_qlora_gpu needs bitsandbytes, which is not installed here "
                "(pip install 'lora-lightning[qlora]'); nothing was measured.\n")
        print(text, end="")
        return text
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        text = "SKIPPED: no CUDA device; run with --device cpu --smoke for the CPU check.\n"
        print(text, end="")
        return text
    sys.path.insert(0, str(HERE.parent))
    import bench_qlora

    forwarded = ["--preset", "tiny" if args.smoke else "gpu", "--device", args.device]
    if args.out:
        forwarded += ["--out", args.out]
    return bench_qlora.main(forwarded)


if __name__ == "__main__":
    main()
