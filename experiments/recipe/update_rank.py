"""What rank LoRA would need to do what full fine-tuning did, read off a full fine-tuning
checkpoint.

    python experiments/recipe/update_rank.py CHECKPOINT DATA_FOLDER [ADAPTER_FOLDER ...]

CHECKPOINT is a full fine-tuning run's ``best.ckpt`` from ``experiment=full_vs_lora
data=text_files lora=none`` (MiniLM with the app's two-class head), DATA_FOLDER the folder
with that run's ``train.csv`` and ``test.csv`` (e.g. ``outputs/recipe_data/speeches``).
Every row is the model as LoRA all-linear could express it: the pretrained MiniLM, the
trained head, and each encoder Linear's weight at ``W0 + ΔW'``, where ``ΔW = W_ft - W0`` is
full fine-tuning's update and ``ΔW'`` one of

* ``truncated to rank k``: ΔW's top ``k`` singular directions (the best rank-``k`` update
  in Frobenius norm; what a rank-``k`` LoRA could at best reach by this route);
* ``inside A from ...``: ΔW restricted to a ``k``-dimensional input subspace (``ΔW·P``), the
  subspace a LoRA ``A`` would start in: random, or the top ``k`` right singular vectors of
  the weight gradient at the start (a random head, the first training batch or the first
  16 of them), the gradient init's choice. ``B`` is then as good as it can be for that
  ``A``.

``energy`` is the share of ``Σ‖ΔW‖²`` that the kept part holds. The test accuracy is read
on the test file. Embeddings, LayerNorms and biases stay pretrained, as under LoRA
all-linear, so the last row (every Linear's whole update) is LoRA's ceiling, below full
fine-tuning's own score, which the first row gives; a last row adds full fine-tuning's
encoder LayerNorms and biases to it (what is left is the embedding tables).

Each ADAPTER_FOLDER (a LoRA run's ``adapter/``, PEFT format) adds a row to a last table:
the size of its update ``s·B·A`` per layer type beside full fine-tuning's ``ΔW``, as the mean
over the six layers of the Frobenius norm, the norm of the top 8 singular directions, and
the largest singular value.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lora_lightning import read_adapter
from lora_lightning.examples import TextFilesDataModule
from lora_lightning.examples.classification.text import MiniLMClassifier

LINEAR = re.compile(r"encoder\.layer\.\d+\..*(query|key|value|dense)\.weight$")
KINDS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


def kind(name: str) -> str:
    """The layer type of a weight's or adapter tensor's name (the longest type that fits)."""
    return max((k for k in KINDS if f".{k}." in f"{name}."), key=len)


def main(checkpoint: str, data: str, adapters: list[str]) -> None:
    dm = TextFilesDataModule(train=f"{data}/train.csv", test=f"{data}/test.csv")
    dm.setup()
    torch.manual_seed(0)
    net = MiniLMClassifier(num_classes=dm.num_classes)
    base = {k: v.clone() for k, v in net.state_dict().items()}
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    tuned = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    linear = [k for k in base if LINEAR.search(k)]
    missing = [k for k in linear if k not in tuned]
    if missing:
        sys.exit(f"{checkpoint} holds no full weights for {len(missing)} encoder Linear layers "
                 f"(e.g. net.{missing[0]}): pass the best.ckpt of a full fine-tuning run "
                 "(lora=none), not of a LoRA run, whose checkpoint holds only the adapters.")
    delta = {k: (tuned[k] - base[k]).double() for k in linear}
    total = sum(float((d ** 2).sum()) for d in delta.values())

    grads = start_gradients(net, dm, linear, batches=(1, 16))
    net.eval()
    loader = dm.test_dataloader()

    @torch.no_grad()
    def accuracy(weights: dict[str, torch.Tensor]) -> float:
        net.load_state_dict(weights)
        right = seen = 0
        for batch in loader:
            labels = batch.pop("labels")
            right += int((net(**batch).argmax(-1) == labels).sum())
            seen += len(labels)
        return right / seen

    lora_like = {k: tuned[k] if k.startswith("classifier.") else base[k] for k in base}

    def row(name: str, kept: dict[str, torch.Tensor], also: list[str] = ()) -> None:
        energy = sum(float((kept[k] ** 2).sum()) for k in linear) / total
        weights = dict(lora_like) | {k: (base[k].double() + kept[k]).float() for k in linear}
        weights |= {k: tuned[k] for k in also}
        print(f"| {name} | {energy:.3f} | {accuracy(weights):.4f} |", flush=True)

    print(f"full fine-tuning as trained: test acc {accuracy(tuned):.4f}\n")
    print("| Linear updates kept | energy | test acc |\n|---|---:|---:|")
    svd = {k: torch.linalg.svd(d, full_matrices=False) for k, d in delta.items()}
    for k in (0, 8, 32, 64):
        row(f"truncated to rank {k}", {n: (u[:, :k] * s[:k]) @ vh[:k] for n, (u, s, vh) in svd.items()})
    gen = torch.Generator().manual_seed(0)
    # Each gradient's right singular vectors once; rank k keeps the first k of them.
    grad_vh = {b: {n: torch.linalg.svd(g[n].double(), full_matrices=False).Vh for n in linear}
               for b, g in grads.items()}
    for k in (8, 64):
        sources = {"random": {n: torch.randn(k, d.shape[1], generator=gen, dtype=torch.double)
                              for n, d in delta.items()}}
        for b, vh in grad_vh.items():
            sources[f"the gradient of {b} batch{'es' if b > 1 else ''}"] = {
                n: v[:k] for n, v in vh.items()}
        for label, rows in sources.items():
            projected = {}
            for n in linear:
                q = torch.linalg.qr(rows[n].T).Q
                projected[n] = delta[n] @ q @ q.T
            row(f"inside A from {label}, r={k}", projected)
    row("every Linear's whole update (LoRA's ceiling)", delta)
    # What LoRA all-linear leaves out but full fine-tuning also trains, short of the
    # embedding tables: the encoder's LayerNorms and biases.
    rest = [k for k in base if ".encoder.layer." in k and k not in linear and k in tuned]
    row("the same + full fine-tuning's LayerNorms and biases", delta, rest)
    if adapters:
        print("\n| update | " + " | ".join(KINDS) + " |\n|---|" + "---:|" * len(KINDS))
        print(sizes("full fine-tuning ΔW", delta))
        for folder in adapters:
            print(sizes(folder, adapter_updates(Path(folder))))


def adapter_updates(folder: Path) -> dict[str, torch.Tensor]:
    """``s·B·A`` of every adapted Linear in an adapter folder, keyed by the layer's name;
    ``s`` is the layer's own scale (``rank_pattern`` and ``alpha_pattern`` included)."""
    config, tensors = read_adapter(folder)
    updates = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A"):
            name = key.removesuffix(".lora_A")
            scale = config.scaling_for(config.rank_for(name), config.alpha_for(name))
            updates[name] = scale * tensors[f"{name}.lora_B"].double() @ a.double()
    return updates


def sizes(label: str, updates: dict[str, torch.Tensor]) -> str:
    """Per layer type: mean Frobenius norm / norm of the top 8 directions / top singular value."""
    cells = []
    for k in KINDS:
        svals = [torch.linalg.svdvals(u) for n, u in updates.items() if kind(n) == k]
        mean = [sum(float(f(s)) for s in svals) / len(svals)
                for f in (lambda s: s.norm(), lambda s: s[:8].norm(), lambda s: s[0])]
        cells.append("/".join(f"{m:.2f}" for m in mean))
    return f"| {label} | " + " | ".join(cells) + " |"


def start_gradients(net, dm, linear, batches) -> dict[int, dict[str, torch.Tensor]]:
    """The summed weight gradients of the first ``max(batches)`` training batches, at the
    start (train mode, the random head), kept after each count in ``batches``."""
    params = dict(net.named_parameters())
    net.train()
    torch.manual_seed(0)
    total = {k: torch.zeros_like(params[k]) for k in linear}
    out = {}
    for i, batch in enumerate(dm.train_dataloader(), start=1):
        labels = batch.pop("labels")
        net.zero_grad()
        F.cross_entropy(net(**batch), labels).backward()
        for k in linear:
            total[k] += params[k].grad
        if i in batches:
            out[i] = {k: v.clone() for k, v in total.items()}
        if i == max(batches):
            return out
    raise ValueError(f"the training file has fewer than {max(batches)} batches")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__.split("\n\n")[1])
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
