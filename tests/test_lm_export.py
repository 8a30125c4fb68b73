"""Export of a LoRA-tuned causal LM: a merged folder that plain transformers loads and that
generates token for token what the live merged model generates, a PEFT adapter folder
that PeftModel loads with identical logits, tied embeddings, the callback and the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import lightning as L
import pytest
import torch
from _helpers import assert_close_fp32, randomize_adapters
from transformers import AutoModelForCausalLM

from lora_lightning import LoRACallback, LoRAConfig, inject_lora, merge_lora
from lora_lightning.examples.language.data import TextDataModule
from lora_lightning.examples.language.export import LMExport, export, export_merged, main
from lora_lightning.examples.language.model import load_causal_lm, load_lm_tokenizer
from lora_lightning.examples.language.module import CausalLMModule

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["To be, or not", "My lord, the king"]


def _trained(model_dir, targets, from_object: bool = False) -> CausalLMModule:
    """A module whose adapters are random (as after training), so merging changes outputs."""
    torch.manual_seed(0)
    if from_object:
        module = CausalLMModule(model=load_causal_lm(model_dir),
                                tokenizer=load_lm_tokenizer(model_dir), prompts=PROMPTS)
    else:
        module = CausalLMModule(model_path=str(model_dir), prompts=PROMPTS)
    inject_lora(module, LoRAConfig(r=4, alpha=8, target_modules=targets))
    # A and B both move (an embedding's A starts at zero)
    randomize_adapters(module, std=0.5, select=lambda n, p: "lora_A" in n or "lora_B" in n)
    return module.eval()


def _greedy(model, tok, prompt: str, n: int = 12) -> torch.Tensor:
    ids = torch.tensor([tok(prompt)["input_ids"]])
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          do_sample=False, pad_token_id=tok.pad_token_id)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_merged_folder_generates_what_the_live_merged_model_does(tmp_path, tiny_lm_dir, targets):
    module = _trained(tiny_lm_dir, targets)
    tok = module.tokenizer
    out = export(module, tmp_path)
    base = load_causal_lm(tiny_lm_dir).eval()
    merge_lora(module)  # the live merged model
    live = module.model
    reloaded = AutoModelForCausalLM.from_pretrained(out["export_merged_dir"]).eval()
    assert type(reloaded) is type(base)  # a plain model: no LoRA layer types, no extra keys
    assert set(reloaded.state_dict()) == set(base.state_dict())
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight  # still tied
    changed = 0
    for prompt in PROMPTS:
        ours = _greedy(live, tok, prompt)
        assert torch.equal(_greedy(reloaded, tok, prompt), ours)
        changed += not torch.equal(_greedy(base, tok, prompt), ours)
    assert changed  # the adapters changed what is generated: the test can tell them apart
    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    torch.testing.assert_close(reloaded(input_ids=ids).logits, live(input_ids=ids).logits)
    assert load_lm_tokenizer(out["export_merged_dir"]).get_vocab() == tok.get_vocab()


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_peft_adapter_folder_gives_identical_logits(tmp_path, tiny_lm_dir, targets):
    from peft import PeftModel

    module = _trained(tiny_lm_dir, targets)
    out = export(module, tmp_path)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and re.escape("model.layers.0.self_attn.q_proj") in config[
        "target_modules"]
    peft = PeftModel.from_pretrained(load_causal_lm(tiny_lm_dir), out["export_adapter_dir"]).eval()
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = module.model(input_ids=ids).logits
        theirs = peft(input_ids=ids).logits
        plain = load_causal_lm(tiny_lm_dir).eval()(input_ids=ids).logits
    assert_close_fp32(theirs, ours)
    assert (ours - plain).abs().max() > 1e-2  # the adapter matters


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_export_unties_an_adapted_tied_weight_and_keeps_the_other(tmp_path, tiny_lm_dir, target):
    module = _trained(tiny_lm_dir, [target])
    model = module.model
    base = model.model.embed_tokens.weight.detach().clone()
    export_merged(model, tmp_path / "merged", module.tokenizer)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # live model untouched
    assert torch.equal(model.model.embed_tokens.weight, base)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert reloaded.config.tie_word_embeddings is False
    adapted, other = ((reloaded.lm_head.weight, reloaded.model.embed_tokens.weight)
                      if target == "lm_head" else
                      (reloaded.model.embed_tokens.weight, reloaded.lm_head.weight))
    assert torch.equal(other, base)  # never changed silently
    assert not torch.equal(adapted, base)
    merge_lora(model, untie=True)
    for prompt in PROMPTS:
        assert torch.equal(_greedy(reloaded, module.tokenizer, prompt),
                           _greedy(model, module.tokenizer, prompt))


def _fit(tmp_path, model_dir, callbacks, lora=True, max_steps=3):
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 40)
    dm = TextDataModule(train_path=str(text), model_path=str(model_dir), seq_len=16, batch_size=4)
    module = CausalLMModule(model_path=str(model_dir), lr=1e-2, prompts=PROMPTS[:1],
                            max_new_tokens=4)
    if lora:
        callbacks = [LoRACallback(LoRAConfig(r=4, alpha=8, target_modules="all-linear")),
                     *callbacks]
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False,
                        callbacks=callbacks, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    return module, trainer


def test_export_callback_writes_and_verifies_both_folders(tmp_path, tiny_lm_dir):
    module, _ = _fit(tmp_path, tiny_lm_dir, [LMExport(str(tmp_path / "export"))])
    res = module.run_results
    assert res["merged_generation_equal"] is True
    assert res["peft_logits_max_abs_diff"] < 1e-5
    assert res["export_adapter_bytes"] < res["export_merged_bytes"]
    assert (tmp_path / "export" / "merged" / "config.json").is_file()
    assert (tmp_path / "export" / "adapter" / "adapter_model.safetensors").is_file()


def test_export_check_of_a_module_built_from_a_model_object(tmp_path, tiny_lm_dir):
    from lora_lightning.examples.language.export import verify

    module = _trained(tiny_lm_dir, ["q_proj", "v_proj"], from_object=True)
    assert not module.model_from_path  # so the check cannot reload a base from model_path
    export(module, tmp_path)
    found = verify(module, tmp_path, PROMPTS)
    assert found["merged_generation_equal"] and found["peft_logits_max_abs_diff"] < 1e-5


@pytest.mark.parametrize("lora", [True, False])
def test_export_command_from_a_checkpoint(tmp_path, tiny_lm_dir, capsys, lora):
    module, trainer = _fit(tmp_path, tiny_lm_dir, [], lora=lora, max_steps=2)
    ckpt = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    assert ckpt
    assert main([ckpt, str(tmp_path / "out")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["merged_generation_equal"] is True
    assert ("export_adapter_dir" in printed) == lora
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "merged")).eval()
    if lora:
        merge_lora(module)
    ids = torch.tensor([module.tokenizer(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits,
                                   module.model.eval()(input_ids=ids).logits)


def test_export_command_names_a_missing_checkpoint(tmp_path, capsys):
    assert main([str(tmp_path / "none.ckpt"), str(tmp_path / "out")]) == 1
    assert "none.ckpt" in capsys.readouterr().err


def test_export_command_runs_without_a_runpy_warning():
    """``python -m lora_lightning.examples.language.export``: the packages above it must not
    import it first, or runpy warns "found in sys.modules after import of package"."""
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    out = subprocess.run([sys.executable, "-m", "lora_lightning.examples.language.export",
                          "--help"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "usage: python -m lora_lightning.examples.language.export" in out.stdout
    assert "RuntimeWarning" not in out.stderr, out.stderr
