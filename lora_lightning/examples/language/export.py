"""Export a fine-tuned causal LM for plain transformers and for PEFT.

Two folders, from the model with adapters (the training model is never changed):

- ``merged/``: the adapters folded into the weights, saved with ``save_pretrained`` (and
  the tokenizer), so ``AutoModelForCausalLM.from_pretrained(merged)`` loads a plain model.
- ``adapter/``: the adapter alone in PEFT's format, so
  ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)``
  gives the same logits.

**Tied weights.** SmolLM2 ties ``lm_head.weight`` to ``model.embed_tokens.weight`` (one
tensor). LoRA on ``q``/``v`` or ``all-linear`` never touches either (all-linear leaves the
output head out). If you target ``lm_head`` or ``embed_tokens`` anyway, merging into the
shared tensor would change the other module too, so the core refuses
(:class:`~lora_lightning.TiedWeightError`). The export unties instead: the adapted
module gets its own merged copy, the other keeps the base weight, and the saved config
says ``tie_word_embeddings: false`` so transformers does not tie them again on load.

After a run of the app: ``LMExport`` (a Lightning callback, in ``experiment=lm_lora``)
writes both at fit end; or, from a checkpoint::

    python -m lora_lightning.examples.language.export <checkpoint.ckpt> <out_dir>
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lora_lightning import (
    META_KEY,
    load_lora_checkpoint,
    lora_layers,
    read_checkpoint,
    save_adapter,
    tied_weights,
    unload_lora,
)

from .model import resolve_model_path

MERGED_DIR = "merged"
ADAPTER_DIR = "adapter"


def merged_copy(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with every adapter merged and removed; plus the untied modules.

    Adapted weights tied to another module are untied in the copy (see the module
    docstring) and its config gets ``tie_word_embeddings = False``.
    """
    untied = sorted(tied_weights(model))
    merged = copy.deepcopy(model)
    unload_lora(merged, merge=True, untie=bool(untied))
    if untied and hasattr(merged, "config"):
        merged.config.tie_word_embeddings = False
        text_config = getattr(merged.config, "get_text_config", lambda: None)()
        if text_config is not None and text_config is not merged.config:
            text_config.tie_word_embeddings = False
    return merged, untied


def export_merged(model: nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Save the merged model (``save_pretrained``) and its tokenizer to ``directory``."""
    directory = Path(directory)
    merged, untied = merged_copy(model) if lora_layers(model) else (model, [])
    if untied:
        rank_zero_info(f"LM export: untied {untied} from the weights they shared, so the "
                       "merge changes only the adapted module (tie_word_embeddings=false).")
    was_cache = merged.config.use_cache
    merged.config.use_cache = True  # the exported model is for inference
    try:
        merged.save_pretrained(str(directory))
    finally:
        merged.config.use_cache = was_cache
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


def export_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Save the adapter of the HF model ``model`` in PEFT's format, keys relative to it.

    ``model`` may be a submodule of the module LoRA was injected into (the ``LoRACallback``
    injects into the LightningModule that holds the HF model): ``save_adapter`` finds the
    adapters' registry from their layers. (No ``modules_to_save``: a causal LM trains none
    here.)
    """
    if not lora_layers(model):
        raise ValueError("export_adapter: the model has no LoRA adapters; inject some first "
                         "(LoRACallback, or inject_lora(model, config)).")
    return save_adapter(model, directory)


def export(module: LightningModule, out_dir: str | Path) -> dict[str, Any]:
    """Write ``out_dir/merged`` and, if the model carries adapters, ``out_dir/adapter``.

    ``module.model`` must be the HF causal LM (as in ``CausalLMModule``). Returns the
    folders and their sizes in bytes.
    """
    model = getattr(module, "model", None)
    if not isinstance(model, nn.Module) or not hasattr(model, "save_pretrained"):
        raise TypeError(
            f"export: {type(module).__name__}.model must be a transformers model (with "
            f"save_pretrained), got {type(model).__name__}; use CausalLMModule."
        )
    out = Path(out_dir)
    result: dict[str, Any] = {}
    path = export_merged(model, out / MERGED_DIR, getattr(module, "tokenizer", None))
    result.update(export_merged_dir=str(path), export_merged_bytes=_size(path))
    if lora_layers(model):
        path = export_adapter(model, out / ADAPTER_DIR)
        result.update(export_adapter_dir=str(path), export_adapter_bytes=_size(path))
    return result


@torch.no_grad()
def verify(module: LightningModule, out_dir: str | Path, prompts: list[str],
           max_new_tokens: int = 16) -> dict[str, Any]:
    """Reload the exports and compare with the live model: greedy tokens of the merged
    folder vs the live model, and PEFT's logits vs ours. Returns what was found."""
    from transformers import AutoModelForCausalLM

    model, out = module.model, Path(out_dir)
    was_training = model.training
    model.eval()
    try:
        found: dict[str, Any] = {}
        reloaded = AutoModelForCausalLM.from_pretrained(str(out / MERGED_DIR)).eval()
        same = True
        for prompt in prompts:
            ids = module.prompt_ids(prompt)
            kwargs = {"attention_mask": torch.ones_like(ids), "max_new_tokens": max_new_tokens,
                      "do_sample": False, "pad_token_id": module.tokenizer.pad_token_id}
            live = model.generate(input_ids=ids, use_cache=True, **kwargs)
            same &= torch.equal(live, reloaded.generate(input_ids=ids, **kwargs))
        found["merged_generation_equal"] = bool(same)
        if (out / ADAPTER_DIR).is_dir():
            from peft import PeftModel

            quantized = any(m.merge_loss for m in lora_layers(model).values())
            if getattr(module, "model_from_path", False) and not quantized:
                path = resolve_model_path(module.hparams.get("model_path"))  # as a user would
                base = AutoModelForCausalLM.from_pretrained(str(path))
            else:  # a model passed in as an object, or a 4-bit base (QLoRA): the model
                base = unload_lora(copy.deepcopy(model), merge=False)  # without adapters
                if quantized:  # PEFT wraps bitsandbytes layers by transformers' flag
                    base.is_loaded_in_4bit = True
            peft = PeftModel.from_pretrained(base, str(out / ADAPTER_DIR)).eval()
            ids = module.prompt_ids(prompts[0] if prompts else "Hello")
            ours = model(input_ids=ids).logits
            theirs = peft(input_ids=ids).logits
            found["peft_logits_max_abs_diff"] = float((ours - theirs).abs().max())
    finally:
        model.train(was_training)
    return found


class LMExport(Callback):
    """After a successful fit, export the merged model and the PEFT adapter to ``dirpath``.

    With ``verify=True`` the exports are reloaded and checked against the live model
    (:func:`verify`). Sizes and checks go to ``pl_module.run_results``, which the app
    writes to ``result.json``. The work is done in ``teardown``, after ``on_fit_end``,
    so the copies it makes do not count in the run's peak memory (``RunRecorder``).
    """

    def __init__(self, dirpath: str, verify: bool = True, max_new_tokens: int = 16) -> None:
        self.dirpath = dirpath
        self.verify = verify
        self.max_new_tokens = max_new_tokens
        self._fit_ended = False

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_ended = True  # not reached when fit fails: nothing half-trained is exported

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or not self._fit_ended or trainer.global_rank != 0:
            return
        self._fit_ended = False
        result = export(pl_module, self.dirpath)
        if self.verify:
            prompts = list(pl_module.hparams.get("prompts") or [])
            result.update(verify(pl_module, self.dirpath, prompts, self.max_new_tokens))
        rank_zero_info(f"LM export: {json.dumps(result)}")
        if hasattr(pl_module, "run_results"):
            pl_module.run_results.update(result)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    """``python -m lora_lightning.examples.language.export CHECKPOINT OUT_DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m lora_lightning.examples.language.export",
        description="Export a CausalLMModule checkpoint as a merged HF folder and a PEFT adapter.",
    )
    parser.add_argument("checkpoint", help="a .ckpt written by a CausalLMModule run")
    parser.add_argument("out_dir", help="writes OUT_DIR/merged and OUT_DIR/adapter")
    parser.add_argument("--model-path", default=None,
                        help="base model folder, if not the one the checkpoint was trained on")
    parser.add_argument("--no-verify", action="store_true", help="skip reloading the exports")
    args = parser.parse_args(argv)

    from .module import CausalLMModule

    kwargs = {"model_path": args.model_path} if args.model_path else {}
    try:
        meta = read_checkpoint(args.checkpoint).get(META_KEY)
        if meta is not None:
            module = load_lora_checkpoint(CausalLMModule, args.checkpoint, **kwargs)
        else:
            module = CausalLMModule.load_from_checkpoint(args.checkpoint, map_location="cpu",
                                                         **kwargs).eval()
        result = export(module, args.out_dir)
        if not args.no_verify:
            result.update(verify(module, args.out_dir, list(module.hparams.prompts)))
    except (OSError, ValueError, TypeError) as err:
        print(f"lm_export: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
