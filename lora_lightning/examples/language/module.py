"""``CausalLMModule``: train any HF ``AutoModelForCausalLM`` on next-token prediction.

Batches are dicts of ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` where no
loss is taken, as :mod:`~lora_lightning.examples.language.data` makes them); the model shifts
the labels itself. Metrics (token-weighted means over the whole split)::

    train/loss                      each step
    val/loss, val/ppl, val/acc      each validation (ppl = exp(loss), acc = next-token accuracy);
                                    also once at step 0, before the first training step
    test/loss, test/ppl, test/acc
    perf/tokens_per_sec, perf/samples_per_sec   training tokens (non-padding) per second
                                    of training-step time, once per epoch
    generations (TensorBoard text)  the fixed ``prompts``, greedy, before and after training

``val/acc`` keeps the app's default checkpoint monitor working; the LM experiment
monitors ``val/ppl``. After ``fit``, :attr:`run_results` holds the numbers the app writes
to ``result.json`` (perplexity before and after, tokens per second, generations).

The model comes from ``model_path`` (a folder written by ``save_pretrained``; ``None`` for
SmolLM2), so ``load_lora_checkpoint(CausalLMModule, ckpt)`` rebuilds it from the
checkpoint's hyperparameters; tests pass a ready ``model`` and ``tokenizer`` instead.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric
from typing_extensions import override

from ..common import adamw_with_warmup, check_optimizer_args
from .data import IGNORE
from .model import ContextLengthError, context_length, load_causal_lm, load_lm_tokenizer

DEFAULT_PROMPTS = (
    "To be, or not to be,",
    "My lord, the king",
    "What is LoRA in machine learning?",
)


class CausalLMModule(L.LightningModule):
    """Next-token training, perplexity and generations for a causal language model.

    Args:
        model_path: folder of a transformers causal LM; ``None`` is SmolLM2 (see
            :mod:`~lora_lightning.examples.language.model`). Ignored when ``model`` is given.
        lr, weight_decay: AdamW settings (over the parameters that require grad).
        warmup_ratio: share of the steps with a linear warmup from 0 to ``lr``.
        gradient_checkpointing: recompute each decoder layer's activations in backward
            (``gradient_checkpointing_enable``, non-reentrant): less memory, more time.
        prompts: fixed prompts generated before and after training (``[]``: none).
        chat_prompts: render the prompts with the chat template (instruction models).
        max_new_tokens: tokens generated per prompt, greedily.
        eval_before: measure validation perplexity once before the first step.
        model, tokenizer: a ready model and tokenizer (not saved as hyperparameters).
    """

    def __init__(
        self,
        model_path: str | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        gradient_checkpointing: bool = False,
        prompts: list[str] | tuple[str, ...] = DEFAULT_PROMPTS,
        chat_prompts: bool = False,
        max_new_tokens: int = 32,
        eval_before: bool = True,
        model: nn.Module | None = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        check_optimizer_args(lr, weight_decay, warmup_ratio)
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"Expected `prompts` to be a list of strings but got {prompts!r}.")
        self.save_hyperparameters(ignore=["model", "tokenizer"])
        self.hparams["prompts"] = list(prompts)
        self.model = model if model is not None else load_causal_lm(model_path)
        self.model_from_path = model is None  # the export check reloads the base from there
        self.tokenizer = tokenizer if tokenizer is not None else load_lm_tokenizer(model_path)
        if gradient_checkpointing:
            enable_checkpointing(self.model)
        self.model.config.use_cache = False  # no KV cache while training; generate() asks for it
        self.metrics = nn.ModuleDict(
            {f"{stage}_{name}": MeanMetric() for stage in ("val", "test") for name in ("loss", "acc")}
        )
        self.run_results: dict[str, Any] = {}
        self._tokens = 0
        self._samples = 0
        self._step_seconds = 0.0
        self._step_start = 0.0

    @override
    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    # -- steps ----------------------------------------------------------------------------
    def _check_length(self, batch: dict[str, torch.Tensor]) -> None:
        context = context_length(self.model.config)
        if context is not None and batch["input_ids"].size(1) > context:
            raise ContextLengthError(batch["input_ids"].size(1), context, "a batch")

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self._check_length(batch)
        loss = self.model(**batch).loss
        self._tokens += int(batch["attention_mask"].sum())
        self._samples += batch["input_ids"].size(0)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        out = self.model(**batch)
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE
        n = int(mask.sum())
        if n == 0:
            return
        correct = (out.logits[:, :-1].argmax(-1) == targets) & mask
        self.metrics[f"{stage}_loss"].update(out.loss.detach().float(), weight=n)
        self.metrics[f"{stage}_acc"].update(correct.sum().float() / n, weight=n)

    def _eval_epoch_end(self, stage: str) -> dict[str, float]:
        loss_metric, acc_metric = self.metrics[f"{stage}_loss"], self.metrics[f"{stage}_acc"]
        if loss_metric.update_count == 0:
            return {}
        loss, acc = float(loss_metric.compute()), float(acc_metric.compute())
        loss_metric.reset()
        acc_metric.reset()
        values = {f"{stage}/loss": loss, f"{stage}/ppl": math.exp(loss), f"{stage}/acc": acc}
        self.log_dict(values, prog_bar=True)
        return values

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    @override
    def on_validation_epoch_end(self) -> None:
        values = self._eval_epoch_end("val")
        if values and not self.trainer.sanity_checking:
            self.run_results["val_ppl_after"] = values["val/ppl"]
            self.run_results["val_loss_after"] = values["val/loss"]

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    @override
    def on_test_epoch_end(self) -> None:
        values = self._eval_epoch_end("test")
        if values:
            self.run_results["test_ppl"] = values["test/ppl"]

    @override
    def configure_optimizers(self) -> Any:
        return adamw_with_warmup(self, self.model)

    # -- before training: context check, perplexity and generations ------------------------
    @override
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        seq_len = getattr(datamodule, "seq_len", None)
        context = context_length(self.model.config)
        if seq_len is not None and context is not None and seq_len > context:
            raise ContextLengthError(seq_len, context, type(datamodule).__name__)

    @override
    def on_train_start(self) -> None:
        self._tokens = self._samples = 0
        self._step_seconds = 0.0
        self.run_results["generations_before"] = self._log_generations("before")
        if not self.hparams.eval_before:
            return
        loaders = self.trainer.val_dataloaders
        if loaders is None and self.trainer.datamodule is not None:
            loaders = self.trainer.datamodule.val_dataloader()
        if loaders is None:
            return
        values = self.evaluate(loaders if isinstance(loaders, list | tuple) else [loaders])
        if values:
            self.run_results["val_ppl_before"] = values["val/ppl"]
            self.run_results["val_loss_before"] = values["val/loss"]
            self._to_loggers(values)
            rank_zero_info(f"LM: before training, val perplexity {values['val/ppl']:.3f}")

    @torch.no_grad()
    def evaluate(self, loaders: list[Any]) -> dict[str, float]:
        """Validation loss, perplexity and accuracy over ``loaders``, in eval mode."""
        was_training = self.training
        self.eval()
        try:
            for loader in loaders:
                for batch in loader:
                    self._eval_step({k: v.to(self.device) for k, v in batch.items()}, "val")
            loss_metric, acc_metric = self.metrics["val_loss"], self.metrics["val_acc"]
            if loss_metric.update_count == 0:
                return {}
            loss, acc = float(loss_metric.compute()), float(acc_metric.compute())
            loss_metric.reset()
            acc_metric.reset()
        finally:
            self.train(was_training)
        return {"val/loss": loss, "val/ppl": math.exp(loss), "val/acc": acc}

    def _to_loggers(self, metrics: dict[str, float]) -> None:
        if self.trainer.global_rank != 0:
            return
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.trainer.global_step)

    # -- generations ----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[str] | None = None, max_new_tokens: int | None = None
                 ) -> list[str]:
        """Greedy continuations of ``prompts`` (default: the module's), one at a time."""
        prompts = self.hparams.prompts if prompts is None else prompts
        n = max_new_tokens or self.hparams.max_new_tokens
        was_training = self.training
        self.eval()
        outputs = []
        try:
            for prompt in prompts:
                ids = self.prompt_ids(prompt).to(self.device)
                out = self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                    do_sample=False, pad_token_id=self.tokenizer.pad_token_id, use_cache=True,
                )
                outputs.append(self.tokenizer.decode(out[0, ids.size(1):], skip_special_tokens=True))
        finally:
            self.train(was_training)
        return outputs

    def prompt_ids(self, prompt: str) -> torch.Tensor:
        """Token ids ``(1, n)`` of a prompt, chat-templated if ``chat_prompts``."""
        if self.hparams.chat_prompts:
            prompt = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(prompt)["input_ids"]
        return torch.tensor([ids], dtype=torch.long)

    def _log_generations(self, when: str) -> list[dict[str, str]]:
        if not self.hparams.prompts:
            return []
        texts = self.generate()
        pairs = [{"prompt": p, "output": t} for p, t in zip(self.hparams.prompts, texts, strict=True)]
        if self.trainer.global_rank == 0:
            table = "| prompt | output |\n|---|---|\n" + "\n".join(
                f"| {_cell(p['prompt'])} | {_cell(p['output'])} |" for p in pairs
            )
            for logger in self.trainer.loggers:
                writer = getattr(logger, "experiment", None)
                if hasattr(writer, "add_text"):  # TensorBoard's SummaryWriter
                    writer.add_text(f"generations/{when}", table, self.trainer.global_step)
        return pairs

    # -- throughput -------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._step_seconds += time.perf_counter() - self._step_start

    def _throughput(self) -> dict[str, float]:
        if self._step_seconds <= 0 or not self._tokens:
            return {}
        return {"perf/tokens_per_sec": self._tokens / self._step_seconds,
                "perf/samples_per_sec": self._samples / self._step_seconds}

    @override
    def on_train_epoch_end(self) -> None:
        for key, value in self._throughput().items():
            self.log(key, value)

    @override
    def on_train_end(self) -> None:
        # since fit started, also when max_steps ends it mid-epoch (no epoch-end hook then)
        throughput = self._throughput()
        if throughput:
            self.run_results["tokens_per_sec"] = throughput["perf/tokens_per_sec"]
            self.run_results["train_tokens"] = self._tokens
        self.run_results["generations_after"] = self._log_generations("after")


def enable_checkpointing(model: nn.Module, use_reentrant: bool = False) -> None:
    """Turn on the HF model's activation (gradient) checkpointing, non-reentrant by default.

    transformers 5 renamed ``gradient_checkpointing_enable`` (the old name warns); both
    work here. A reentrant checkpoint also needs ``model.enable_input_require_grads()``
    when the embedding is frozen, or the adapters get no gradient; ``LoRACallback`` does
    that at fit start.
    """
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_checkpointing(model: nn.Module) -> bool:
    """Whether the HF model recomputes activations in backward (either transformers name)."""
    flag = getattr(type(model), "is_activation_checkpointing", None)
    return bool(model.is_activation_checkpointing if flag is not None
                else getattr(model, "is_gradient_checkpointing", False))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ⏎ ").strip()
