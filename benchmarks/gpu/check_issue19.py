"""LoRA at LLM scale under sharding (issue 19, items 1 and 6): one prepared check.

A Llama-shaped 1.1B model (TinyLlama's shape, built from a config: random weights, nothing
downloaded) trains with ``LoRACallback(LoRAConfig(r=16, alpha=32,
target_modules="all-linear"))`` for a few steps of 8 x 1024 tokens under each strategy
below. Each mode runs in its own process and prints one JSON line per result:

- ``fit``: peak GPU memory of the fit, tokens/s, adapter and base dtypes, the gradient
  memory at the optimizer step (``grad_mb``; FSDP1 with ``use_orig_params=True`` keeps a
  gradient for its whole flat parameter, frozen weights included) and how many frozen
  parameters hold a gradient;
- ``checkpoint``: the adapter-only checkpoint's size, how many of its tensors are not
  adapter tensors and how many keys carry a wrapper segment (``_fsdp_wrapped_module.``,
  ``_checkpoint_wrapped_module.``, ``_orig_mod.``);
- ``resume``: ``fit(ckpt_path=...)``; the adapters at train start against the trained ones
  (``max_diff`` 0.0: exact), then two more steps;
- ``load``: ``load_lora_checkpoint`` into the plain, unwrapped model (same comparison);
- ``peft``: the ``export_adapter_dir`` directory loaded by PEFT on the plain base: its
  logits against ours;
- ``summary`` (the driver): peak memory of each FSDP mode over the single-device one of the
  same base dtype.

Modes: ``single32`` (float32 base, bf16-mixed: the memory reference), ``single`` (bfloat16
base as ``from_pretrained(torch_dtype=torch.bfloat16)`` gives, bf16-mixed: float32
adapters), ``fsdp`` (``FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer},
use_orig_params=True)``, float32 base), ``fsdp_ac`` (the same with
``activation_checkpointing_policy``), ``fsdp_sharded`` (``state_dict_type="sharded"``),
``fsdp2`` (``ModelParallelStrategy``, ``fully_shard`` of each decoder layer in
``configure_model``), ``fsdp_bf16`` (FSDP1 on the bfloat16 base). A failure is reported as a
JSON line with the error and the next mode runs.

On the GPU machine (one H200: under 5 minutes; no hydra needed)::

    bash benchmarks/gpu/run_issue19.sh

On CPU in seconds, the single-device modes on a tiny Llama (FSDP needs CUDA and is
skipped with the reason printed; ``tests/test_gpu_check_smoke.py`` runs this)::

    python benchmarks/gpu/check_issue19.py --smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

MODES = ("single32", "fsdp", "single", "fsdp_ac", "fsdp_sharded", "fsdp2", "fsdp_bf16")
"""In order of importance: a run short of time drops the last ones."""
WRAPPERS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


# -- the model -----------------------------------------------------------------------------
def llama_config(size: str):
    from transformers import LlamaConfig

    if size == "tiny":
        c = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                        max_position_embeddings=256)
    else:  # TinyLlama-1.1B's shape
        c = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                        num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                        max_position_embeddings=2048)
    c._attn_implementation = "sdpa"
    return c


def build_lm_class():
    import lightning as L
    import torch

    class LM(L.LightningModule):
        """A Llama for causal LM; seeded, so every instance has the same base weights."""

        def __init__(self, size: str = "1b", dtype: str = "fp32", device: str = "cuda",
                     fully_shard_layers: bool = False) -> None:
            super().__init__()
            self.save_hyperparameters()
            from transformers import LlamaForCausalLM

            torch.manual_seed(0)
            with torch.device(device):
                self.model = LlamaForCausalLM(llama_config(size))
            if dtype == "bf16":
                self.model.to(torch.bfloat16)

        def configure_model(self) -> None:
            if not self.hparams.fully_shard_layers:
                return
            try:
                from torch.distributed.fsdp import fully_shard
            except ImportError:  # torch < 2.6
                from torch.distributed._composable.fsdp import fully_shard
            mesh = self.device_mesh["data_parallel"]  # 1-D: plain FSDP, not HSDP
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

        def forward(self, input_ids):
            return self.model(input_ids=input_ids).logits

        def training_step(self, batch, batch_idx):
            loss = self.model(input_ids=batch, labels=batch).loss
            self.last_loss = float(loss.detach())
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad],
                                     lr=1e-3)

    return LM


# -- measurements --------------------------------------------------------------------------
def canonical(name: str) -> str:
    return ".".join(p for p in name.split(".") if p not in WRAPPERS)


def full(t):
    """A parameter's whole value on the CPU (an FSDP2 DTensor gathered)."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.float().cpu().clone()  # a copy, never a view of the live parameter


def adapter_values(module) -> dict:
    return {canonical(n): full(p) for n, p in module.named_parameters() if "lora_" in n}


def max_diff(a: dict, b: dict) -> float | None:
    if set(a) != set(b) or not a:
        return None
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def grad_memory(module) -> tuple[int, int]:
    """(bytes of gradient storage, frozen parameters holding a gradient), counting FSDP1's
    flat parameters (``use_orig_params=True`` views the originals' gradients into them)."""
    tensors, frozen = list(module.parameters()), 0
    for m in module.modules():
        handle = getattr(m, "_handle", None)
        if handle is not None and getattr(handle, "flat_param", None) is not None:
            tensors.append(handle.flat_param)
    seen, total = set(), 0
    for p in tensors:
        g = p.grad
        if g is None:
            continue
        if hasattr(g, "to_local"):
            g = g.to_local()
        frozen += not p.requires_grad
        storage = g.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total, frozen


def checkpoint_report(path: Path) -> dict:
    import torch

    if path.is_dir():  # a sharded checkpoint: a directory of shards
        return {"ckpt_mb": round(sum(f.stat().st_size for f in path.rglob("*")
                                     if f.is_file()) / 1e6, 1), "format": "directory"}
    state = torch.load(path, map_location="cpu", weights_only=False)
    sd = state.get("state_dict", {})
    return {"ckpt_mb": round(path.stat().st_size / 1e6, 1), "tensors": len(sd),
            "non_adapter_tensors": sum("lora_" not in k for k in sd),
            "wrapper_keys": sum(any(w in k for w in WRAPPERS) for k in sd),
            "adapter_tensor_dtypes": sorted({str(v.dtype) for v in sd.values()})}


# -- one mode ------------------------------------------------------------------------------
def strategy_for(mode: str):
    if not mode.startswith("fsdp"):
        return "auto"
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    if mode == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    from lightning.pytorch.strategies import FSDPStrategy

    kw = {"auto_wrap_policy": {LlamaDecoderLayer}, "use_orig_params": True}
    if mode == "fsdp_ac":
        kw["activation_checkpointing_policy"] = {LlamaDecoderLayer}
    if mode == "fsdp_sharded":
        kw["state_dict_type"] = "sharded"
    return FSDPStrategy(**kw)


def run_mode(mode: str, size: str, device: str, steps: int, root: Path) -> None:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    import lora_lightning as ll

    LM = build_lm_class()
    cuda = device == "cuda"
    dtype = "bf16" if mode in ("single", "fsdp_bf16") else "fp32"
    T, B = (1024, 8) if size != "tiny" else (32, 4)
    vocab = llama_config(size).vocab_size
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (B * (steps + 4), T), generator=g)
    data = DataLoader(list(tokens), batch_size=B)
    cfg = ll.LoRAConfig(r=16, alpha=32, target_modules="all-linear")
    root.mkdir(parents=True, exist_ok=True)
    peft_dir = root / f"{mode}_peft"
    shutil.rmtree(peft_dir, ignore_errors=True)

    class Probe(L.Callback):
        """Adapters at train start; gradient memory at the optimizer step; throughput."""

        def __init__(self) -> None:
            self.start = self.grads = self.t0 = None
            self.tokens = 0

        def on_train_start(self, trainer, pl_module):
            self.start = adapter_values(pl_module)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if self.grads is None:
                self.grads = grad_memory(pl_module)

        def on_train_batch_start(self, trainer, pl_module, batch, i):
            if trainer.global_step == 2 and self.t0 is None:
                if cuda:
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, out, batch, i):
            if self.t0 is not None:
                self.tokens += batch.numel()

        def rate(self):
            if cuda:
                torch.cuda.synchronize()
            return round(self.tokens / (time.perf_counter() - self.t0)) if self.t0 else None

    def trainer(max_steps: int, probe: Probe, export: bool = False) -> L.Trainer:
        return L.Trainer(
            accelerator="cuda" if cuda else "cpu", devices=1, strategy=strategy_for(mode),
            precision="bf16-mixed", max_steps=max_steps, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=root, callbacks=[ll.LoRACallback(
                cfg, verbose=False, export_adapter_dir=str(peft_dir) if export else None),
                probe])

    def lm():
        return LM(size, dtype, device, fully_shard_layers=mode == "fsdp2")

    # fit
    probe = Probe()
    t = trainer(steps, probe, export=True)
    model = lm()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    t.fit(model, data)
    fit_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    trained = adapter_values(model)
    grad_bytes, frozen_with_grad = probe.grads or (None, None)
    emit(mode=mode, step="fit", ok=True, fit_s=round(fit_s, 1), tokens_per_s=probe.rate(),
         peak_gib=round(peak, 2) if peak else None,
         trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
         adapter_dtypes=sorted({str(p.dtype) for n, p in model.named_parameters()
                                if "lora_" in n}),
         base_dtypes=sorted({str(p.dtype) for n, p in model.named_parameters()
                             if "lora_" not in n}),
         grad_mb=round(grad_bytes / 1e6, 1) if grad_bytes is not None else None,
         frozen_with_grad=frozen_with_grad, loss=getattr(model, "last_loss", None))
    # the adapter-only checkpoint
    path = root / f"{mode}.ckpt"
    if path.is_dir():
        shutil.rmtree(path)
    t1 = time.perf_counter()
    t.save_checkpoint(path)
    emit(mode=mode, step="checkpoint", ok=True, save_s=round(time.perf_counter() - t1, 2),
         **checkpoint_report(path))
    del t, model
    if cuda:
        torch.cuda.empty_cache()
    # resume: the adapters at train start are the trained ones, then two more steps
    try:
        probe2 = Probe()
        t2 = trainer(steps + 2, probe2)
        resumed = lm()
        t2.fit(resumed, data, ckpt_path=path)
        diff = max_diff(probe2.start, trained)
        emit(mode=mode, step="resume", ok=diff == 0.0, max_diff=diff,
             global_step=t2.global_step, loss=getattr(resumed, "last_loss", None))
        del t2, resumed
    except Exception as err:  # noqa: BLE001 - reported, the next check runs
        emit(mode=mode, step="resume", ok=False, error=repr(err)[:800])
    if cuda:
        torch.cuda.empty_cache()
    # load into the plain, unwrapped model
    plain = None
    try:
        if path.is_dir():
            raise NotImplementedError("a sharded checkpoint directory: load_lora_checkpoint "
                                      "reads one file")
        plain = ll.load_lora_checkpoint(LM(size, dtype, device), path)
        diff = max_diff(adapter_values(plain), trained)
        emit(mode=mode, step="load", ok=diff == 0.0, max_diff=diff,
             adapter_dtypes=sorted({str(p.dtype) for n, p in plain.named_parameters()
                                    if "lora_" in n}))
    except Exception as err:  # noqa: BLE001
        emit(mode=mode, step="load", ok=False, error=repr(err)[:800])
    # PEFT loads the exported directory on the plain base: same logits as ours
    try:
        import peft

        if not (peft_dir / "adapter_config.json").exists():
            raise FileNotFoundError(f"export_adapter_dir wrote no {peft_dir}/adapter_config.json")
        # module names are the LightningModule's (``model.model.layers.0...``), so PEFT
        # wraps a fresh LightningModule of the same base
        pm = peft.PeftModel.from_pretrained(LM(size, dtype, device), str(peft_dir)).eval()
        ours = plain if plain is not None else ll.load_adapter(LM(size, dtype, device), peft_dir)
        ids = tokens[:2, :64].to(device)
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            a, b = pm(ids).float(), ours.eval()(ids).float()
        rel = float((a - b).abs().max() / b.abs().max())
        emit(mode=mode, step="peft", ok=rel < 2e-2, max_rel_diff=round(rel, 5))
    except Exception as err:  # noqa: BLE001
        emit(mode=mode, step="peft", ok=False, error=repr(err)[:800])
    # a whole-model "adapter-only" checkpoint is 4 GB: free the disk for the next mode
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


# -- the driver ----------------------------------------------------------------------------
def drive(args) -> int:
    """Each mode in its own process (a crash or hang costs one mode), within a budget."""
    results, started = [], time.perf_counter()
    for mode in args.modes:
        if mode.startswith("fsdp") and args.device != "cuda":
            emit(mode=mode, step="skipped", ok=None,
                 reason="FSDP and ModelParallelStrategy need CUDA (Lightning's FSDP does "
                        "not run on CPU); run this on the GPU machine")
            continue
        left = args.budget_s - (time.perf_counter() - started)
        if left < 20:
            emit(mode=mode, step="skipped", ok=None, reason=f"budget {args.budget_s}s spent")
            continue
        cmd = [sys.executable, __file__, "--mode", mode, "--size", args.size,
               "--device", args.device, "--steps", str(args.steps), "--root", str(args.root)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  timeout=min(args.mode_timeout_s, left))
            out, rc = proc.stdout, proc.returncode
            tail = proc.stderr[-1500:]
        except subprocess.TimeoutExpired as err:
            out, rc, tail = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) \
                else (err.stdout or ""), "timeout", ""
        lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        if rc != 0:  # a crash, a timeout or an import error: a failure like a failed step
            lines.append({"mode": mode, "step": "process", "ok": False, "returncode": rc,
                          "stderr_tail": tail})
        for line in lines:
            print(json.dumps(line), flush=True)
        results += lines
    peaks = {r["mode"]: r["peak_gib"] for r in results if r.get("step") == "fit"
             and r.get("peak_gib")}
    ref = {"fp32": peaks.get("single32"), "bf16": peaks.get("single")}
    failed = sorted({f"{r['mode']}:{r['step']}" for r in results if r.get("ok") is False})
    emit(step="summary", elapsed_s=round(time.perf_counter() - started, 1), failed=failed,
         peak_gib=peaks, peak_vs_single={
             m: round(p / ref["bf16" if m == "fsdp_bf16" else "fp32"], 3)
             for m, p in peaks.items()
             if m.startswith("fsdp") and ref["bf16" if m == "fsdp_bf16" else "fp32"]})
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=MODES, help="run one mode in this process")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--size", choices=["tiny", "1b"], default="1b")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--root", type=Path, default=Path("/tmp/issue19_check"),
                    help="checkpoints and adapter directories (not $OUT: they are large)")
    ap.add_argument("--budget-s", type=float, default=200)
    ap.add_argument("--mode-timeout-s", type=float, default=75)
    ap.add_argument("--smoke", action="store_true",
                    help="--size tiny --device cpu --steps 3: the single-device modes in seconds")
    args = ap.parse_args()
    if args.smoke:
        args.size, args.device, args.steps = "tiny", "cpu", 3
    if args.mode:
        run_mode(args.mode, args.size, args.device, args.steps, args.root)
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
