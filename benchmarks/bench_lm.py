"""Side-by-side benchmark on a real LLM: SmolLM2-135M-Instruct, ours vs PEFT vs full FT.

One process, one batch of Hamlet (SmolLM2's tokenizer, packed blocks), six trainable
copies of the model, timed *interleaved* (one step of each per round, the first rotating)
with the machinery of ``bench_lora.py`` (same step, timing, ratio and memory accounting):

- full fine-tuning (AdamW over all 134.5M parameters);
- LoRA r=8, alpha=16 on q,v: ours (``inject_lora``) and PEFT (``get_peft_model``);
- LoRA r=8, alpha=16 on every linear layer of the decoder (q, k, v, o, gate, up, down;
  the tied ``lm_head`` is left out, as ``all-linear`` does): ours and PEFT;
- ours on q,v with activation (gradient) checkpointing on the HF model, non-reentrant,
  for the memory it saves and the time it costs.

Step = forward + cross-entropy over the next tokens + backward + ``AdamW.step``. A ratio is
the median over rounds of the ratio inside a round. Peak memory is the peak of live tensor
bytes during one profiled step (``bench_lora.measure_memory``).

    python benchmarks/bench_lm.py --out benchmarks/results_lm.md    # ~10 min on 2 shared cores

Needs SmolLM2 (``make lm`` installs it). Exits 0 even when a check fails; the table says.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_lora.py

import argparse  # noqa: E402
import copy  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lora as bl  # noqa: E402

from lora_lightning import LoRAConfig  # noqa: E402

QV = ["q_proj", "v_proj"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MiB = 2**20


class Logits(nn.Module):
    """The HF causal LM with a plain ``forward(input_ids) -> logits`` for the shared step."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.lm(input_ids=input_ids).logits


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def smollm2_case(batch: int, seq: int, model_path: str | None = None) -> bl.Case:
    from lora_lightning.examples import TextDataModule, load_causal_lm

    dm = TextDataModule(model_path=model_path, seq_len=seq + 1, batch_size=batch)
    dm.setup()
    ids = torch.stack([dm.datasets["train"][i]["input_ids"] for i in range(batch)])
    lm = load_causal_lm(model_path)
    lm.config.use_cache = False
    configs = {"r=8 q,v": LoRAConfig(r=8, alpha=16, target_modules=QV),
               "r=8 all-linear": LoRAConfig(r=8, alpha=16, target_modules=ALL_LINEAR)}
    name = "SmolLM2-135M-Instruct" if model_path is None else Path(model_path).name
    return bl.Case(name, Logits(lm), {"input_ids": ids[:, :-1].contiguous()},
                   ids[:, 1:].contiguous(), lm_loss, configs)


def checkpointed_variant(ours_qv: bl.Variant) -> bl.Variant:
    from lora_lightning.examples.language.module import enable_checkpointing

    net = copy.deepcopy(ours_qv.net)
    enable_checkpointing(net.lm)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    return bl.Variant(ours_qv.model, "r=8 q,v + ckpt", "ours", net,
                      torch.optim.AdamW(params, lr=1e-4), None, ours_qv.trainable)


def run(batch: int, seq: int, warmup: int, steps: int, threads: int | None,
        model_path: str | None = None) -> str:
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    case = smollm2_case(batch, seq, model_path)
    variants = bl.build_variants(case, inject_reps=1)
    by = {(v.config, v.method): v for v in variants}
    variants.append(checkpointed_variant(by[("r=8 q,v", "ours")]))
    by[("r=8 q,v + ckpt", "ours")] = variants[-1]
    bl.time_interleaved(variants, case, warmup, steps)
    for v in variants:
        bl.measure_memory(v, case)

    def ratio(a, b) -> float:
        return bl.paired_ratio(by[a].step_s, by[b].step_s)

    rows = [
        ("ours / PEFT, step time, r=8 q,v", "≤ 1.00", ratio(("r=8 q,v", "ours"), ("r=8 q,v", "peft"))),
        ("ours / PEFT, step time, r=8 all-linear", "≤ 1.00",
         ratio(("r=8 all-linear", "ours"), ("r=8 all-linear", "peft"))),
        ("ours q,v / full FT, step time", "—", ratio(("r=8 q,v", "ours"), ("-", "full"))),
        ("ours all-linear / full FT, step time", "—",
         ratio(("r=8 all-linear", "ours"), ("-", "full"))),
        ("ours q,v: checkpointing / none, step time", "—",
         ratio(("r=8 q,v + ckpt", "ours"), ("r=8 q,v", "ours"))),
    ]
    lines = [
        f"# {case.model}: ours vs PEFT vs full fine-tuning ({batch} x {seq} tokens)",
        "",
        f"Command: `python benchmarks/bench_lm.py --batch {batch} --seq {seq} --warmup {warmup} "
        f"--steps {steps}{f' --threads {threads}' if threads else ''}`; torch "
        f"{torch.__version__}, {torch.get_num_threads()} thread(s), {platform.machine()}, "
        f"{os.cpu_count()} cores (shared with other jobs); {steps} interleaved rounds after "
        f"{warmup} warm-up; whole run {time.perf_counter() - t0:.0f} s.",
        "",
        "| check | target | measured | result |",
        "|---|---|---|---|",
    ]
    for name, target, value in rows:
        result = "—" if target == "—" else ("PASS" if value <= 1.0 else "FAIL")
        lines.append(f"| {name} | {target} | {value:.3f} | {result} |")
    lines += ["", "| variant | trainable | step median (s) | IQR (s) | peak live MiB | "
              "saved for backward MiB |", "|---|---:|---:|---|---:|---:|"]
    for v in variants:
        q1, q3 = v.step_iqr
        peak = "n/a" if v.peak_bytes is None else f"{v.peak_bytes / MiB:,.0f}"
        name = "full fine-tuning" if v.method == "full" else f"{v.method} {v.config}"
        lines.append(f"| {name} | {v.trainable:,} | {v.step_median:.2f} | {q1:.2f}–{q3:.2f} | "
                     f"{peak} | {v.saved_bytes / MiB:,.0f} |")
    plain, ckpt = by[("r=8 q,v", "ours")], by[("r=8 q,v + ckpt", "ours")]
    if plain.peak_bytes and ckpt.peak_bytes:
        lines += ["", f"Gradient checkpointing (ours, q,v): peak live memory "
                  f"{plain.peak_bytes / MiB:,.0f} → {ckpt.peak_bytes / MiB:,.0f} MiB "
                  f"({(plain.peak_bytes - ckpt.peak_bytes) / MiB:,.0f} MiB saved, "
                  f"{1 - ckpt.peak_bytes / plain.peak_bytes:.0%}); activations saved for "
                  f"backward {plain.saved_bytes / MiB:,.0f} → {ckpt.saved_bytes / MiB:,.0f} MiB."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--model-path", default=None,
                        help="another causal LM folder (default: SmolLM2); tests use a tiny one")
    args = parser.parse_args(argv)
    report = run(args.batch, args.seq, args.warmup, args.steps, args.threads, args.model_path)
    print(report)
    if args.out:
        args.out.write_text(report)
    return report


if __name__ == "__main__":
    main()
