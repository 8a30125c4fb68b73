"""Adapter directories in PEFT's on-disk format.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with PEFT's key
names (``base_model.model.<module>.lora_A.weight`` ...), so an adapter trained here loads
with ``PeftModel.from_pretrained`` and a PEFT adapter loads here. Files are written to a
temporary name and renamed, so a crash mid-save never leaves a half-written adapter.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from torch import Tensor, nn

import torch

from .checkpoint import AdapterLoadError, adapter_keys, adapter_state_dict, load_adapter_state_dict
from .config import LoRAConfig
from .inject import find_config, inject_lora, lora_layers
from .layer_base import LoRALayer
from .layers import LoRAEmbedding
from .layers_mha import LoRAMultiheadAttention
from .merge import unload_lora

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# PEFT features this package does not implement: loading them would silently differ.
_UNSUPPORTED = (
    "layers_to_transform", "layers_pattern", "lora_bias", "target_parameters", "use_qalora",
    "alora_invocation_tokens", "trainable_token_indices", "layer_replication",
    "megatron_config", "use_bdlora",
)


class AdapterFileError(ValueError):
    """An adapter directory is missing, unreadable or not a LoRA adapter we support."""


# -- key translation ------------------------------------------------------------------
def _mha_out_projs(layers: dict[str, LoRALayer]) -> set[str]:
    """Names of out_proj layers adapted as part of their nn.MultiheadAttention."""
    return {f"{n}.out_proj" for n, m in layers.items() if isinstance(m, LoRAMultiheadAttention)}


def to_peft_keys(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our adapter keys -> PEFT's file keys."""
    layers = lora_layers(model)
    mha_out = _mha_out_projs(layers)
    out = {}
    for key, value in state_dict.items():
        owner, _, leaf = key.rpartition(".")
        layer = layers.get(owner)
        if owner in mha_out:  # PEFT wraps MHA, so its out_proj sits under base_layer
            mha, _, child = owner.rpartition(".")
            owner = f"{mha}.base_layer.{child}"
        if layer is None:
            new = key
        elif leaf in ("lora_A", "lora_B"):
            emb = isinstance(layer, LoRAEmbedding)
            new = f"{owner}.lora_embedding_{leaf[-1]}" if emb else f"{owner}.{leaf}.weight"
        elif leaf == "lora_magnitude":
            new = f"{owner}.lora_magnitude_vector"
        else:
            new = f"{owner}.base_layer.{leaf}"
        out[_PREFIX + new] = value
    return out


_FROM_PEFT = [
    (re.compile(r"\.lora_([AB])\.weight$"), r".lora_\1"),
    (re.compile(r"\.lora_embedding_([AB])$"), r".lora_\1"),
    (re.compile(r"\.lora_magnitude_vector$"), ".lora_magnitude"),
    (re.compile(r"\.base_layer\."), "."),
]


def from_peft_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """PEFT's file keys -> our adapter keys."""
    out = {}
    for key, value in state_dict.items():
        new = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        for pattern, repl in _FROM_PEFT:
            new = pattern.sub(repl, new)
        out[new] = value
    return out


# -- config translation ---------------------------------------------------------------
def to_peft_config(model: nn.Module, config: LoRAConfig) -> dict[str, Any]:
    """A PEFT ``LoraConfig`` dict naming exactly the modules that carry adapters (as a
    full-match regex, so that no other module with the same name suffix is adapted)."""
    layers = lora_layers(model)
    for name in _mha_out_projs(layers):  # PEFT adapts it as part of the attention module
        layers.pop(name, None)
    # Exact names only: a list would also match dotted suffixes ("lin" -> "block.lin"), and
    # both PEFT and we match rank/alpha keys against suffixes too, hence the "^" anchor.
    exact = {n: "^" + re.escape(n) for n in layers}
    rank_pattern = {exact[n]: m.r for n, m in layers.items() if m.r != config.r}
    alpha_pattern = {
        exact[n]: m.lora_alpha for n, m in layers.items() if m.lora_alpha != config.alpha
    }
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": "|".join(re.escape(n) for n in sorted(layers)),
        "exclude_modules": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "bias": config.bias,
        "modules_to_save": config.modules_to_save,
        "fan_in_fan_out": any(type(m)._lora_base_class.__name__ == "Conv1D"
                              for m in layers.values()),
        "lora_lightning": config.to_dict(),
    }


def from_peft_config(data: dict[str, Any], source: str = CONFIG_NAME) -> LoRAConfig:
    """Build a :class:`LoRAConfig` from a PEFT ``adapter_config.json`` dict."""
    if not isinstance(data, dict):
        raise AdapterFileError(f"{source}: expected a JSON object, got {type(data).__name__}.")
    if data.get("peft_type", "LORA") != "LORA":
        raise AdapterFileError(
            f"{source}: peft_type is {data.get('peft_type')!r}; only 'LORA' adapters load here."
        )
    for key in _UNSUPPORTED:
        if data.get(key):
            raise AdapterFileError(
                f"{source}: field {key!r} is {data[key]!r}, a PEFT feature lora-lightning does "
                "not implement; load this adapter with PEFT instead."
            )
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in data:
            raise AdapterFileError(f"{source}: required field {key!r} is missing.")
    init = data.get("init_lora_weights", True)
    try:
        return LoRAConfig(
            r=data["r"],
            alpha=data["lora_alpha"],
            dropout=data.get("lora_dropout", 0.0) or 0.0,
            target_modules=data["target_modules"],
            exclude_modules=data.get("exclude_modules"),
            rank_pattern=data.get("rank_pattern") or {},
            alpha_pattern=data.get("alpha_pattern") or {},
            use_rslora=bool(data.get("use_rslora", False)),
            use_dora=bool(data.get("use_dora", False)),
            init="gaussian" if init == "gaussian" else "kaiming",
            bias=data.get("bias", "none"),
            modules_to_save=data.get("modules_to_save"),
        )
    except (TypeError, ValueError) as err:
        raise AdapterFileError(f"{source}: invalid LoRA settings: {err}") from err


# -- files ----------------------------------------------------------------------------
def _stage(path: Path, write) -> Path:
    """Write ``path``'s new content to a temporary file beside it (fsynced); return its name.

    A failed write removes the temporary file and raises ``OSError`` naming ``path``.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        # safetensors reports I/O failures as its own SafetensorError, without the file name
        if isinstance(err, OSError) or type(err).__name__ == "SafetensorError":
            raise _write_error(path, err) from err
        raise
    return Path(tmp)


def _write_error(path: Path, err: BaseException) -> OSError:
    unchanged = f"save_adapter wrote nothing; the adapter in {path.parent} is unchanged"
    if isinstance(err, OSError) and err.errno is not None:
        return OSError(err.errno, f"{err.strerror}; {unchanged}", str(path))
    return OSError(f"{path}: could not be written ({type(err).__name__}: {err}); {unchanged}.")


def save_adapter(model: nn.Module, directory: str | os.PathLike, config: LoRAConfig | None = None
                 ) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` to ``directory``.

    Both files are written to temporary names first and renamed only once both are
    complete, so a crash or a full disk mid-save leaves the previous adapter loadable.
    """
    from safetensors.torch import save_file

    config = config or find_config(model)
    if config is None or not lora_layers(model):
        raise ValueError(
            "save_adapter: the model has no LoRA layers; call inject_lora(model, config) first."
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().cpu().contiguous().clone()
        for k, v in to_peft_keys(model, adapter_state_dict(model)).items()
    }
    text = json.dumps(to_peft_config(model, config), indent=2, sort_keys=True)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, write in ((WEIGHTS_NAME, lambda p: save_file(tensors, p)),
                            (CONFIG_NAME, lambda p: Path(p).write_text(text))):
            staged.append((_stage(directory / name, write), directory / name))
        for tmp, final in staged:
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return directory


def read_adapter(directory: str | os.PathLike) -> tuple[LoRAConfig, dict[str, Tensor]]:
    """Read an adapter directory into a config and a state dict with our key names.

    Each problem is reported once, naming the file and what is wrong with it.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"adapter directory {str(directory)!r} does not exist.")
    cfg_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise AdapterFileError(f"{cfg_path}: missing; an adapter directory needs {CONFIG_NAME}.")
    try:
        data = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"{cfg_path}: not valid JSON ({err}).") from err
    data.pop("lora_lightning", None) if isinstance(data, dict) else None
    config = from_peft_config(data, str(cfg_path))
    if not weights_path.is_file():
        raise AdapterFileError(f"{weights_path}: missing; the adapter has no weights file.")
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types on corrupt files
        raise AdapterFileError(
            f"{weights_path}: unreadable safetensors file (truncated or corrupted?): {err}"
        ) from err
    return config, from_peft_keys(tensors)


BASE_WEIGHT_RULES = ("check", "apply")


def _base_weights(model: nn.Module, state: dict[str, Tensor], rule: str,
                  source: str) -> dict[str, Tensor]:
    """Take out of ``state`` the frozen base weights of adapted layers that PEFT saves
    (``embed_tokens.base_layer.weight`` under ``save_embedding_layers="auto"``).

    ``"check"``: each must equal the model's own, else the load is refused naming the key.
    ``"apply"``: they are returned, to be copied into the base once the adapter fits.
    """
    trained = set(adapter_keys(model))
    params = dict(model.named_parameters())
    base_keys = {f"{n}.{leaf}" for n, m in lora_layers(model).items()
                 for leaf, _ in m.named_parameters(recurse=False)} - trained
    found = {k: state.pop(k) for k in sorted(set(state) & base_keys)}
    if rule == "check":
        for key, value in found.items():
            mine = params[key]
            if value.shape != mine.shape or not torch.equal(value.to(mine.dtype), mine.detach()):
                raise AdapterLoadError(
                    f"{source}: the adapter file holds the base weight {key!r} (PEFT saves "
                    f"embedding layers with the adapter), shape {tuple(value.shape)}, and it "
                    f"differs from this model's ({tuple(mine.shape)}). Load it with "
                    "load_adapter(..., base_weights='apply') to use the saved weight, or load "
                    "the adapter into the base model it was trained on."
                )
        return {}
    return found


def load_adapter(model: nn.Module, directory: str | os.PathLike,
                 base_weights: str = "check") -> nn.Module:
    """Load a PEFT-format adapter into ``model``, injecting LoRA first if needed.

    If ``model`` already carries adapters, their layout must match the file's. Nothing is
    written to the model unless the whole adapter fits. Base weights that PEFT saves beside
    the adapter (embedding layers) are checked against the model's (``base_weights="check"``,
    a difference is refused) or copied into it (``"apply"``).
    """
    if base_weights not in BASE_WEIGHT_RULES:
        raise ValueError(f"load_adapter.base_weights: got {base_weights!r}; expected one of "
                         f"{list(BASE_WEIGHT_RULES)}.")
    config, state = read_adapter(directory)
    source = str(Path(directory) / WEIGHTS_NAME)
    if any(isinstance(m, LoRALayer) for m in model.modules()):
        base = _base_weights(model, state, base_weights, source)
        load_adapter_state_dict(model, state)
        _copy_base(model, base)
        return model
    flags = {id(p): p.requires_grad for p in model.parameters()}
    inject_lora(model, config)
    try:
        base = _base_weights(model, state, base_weights, source)
        load_adapter_state_dict(model, state)
        _copy_base(model, base)
    except Exception:
        unload_lora(model, merge=False)  # leave the model as it was
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), p.requires_grad))
        raise
    return model


def _copy_base(model: nn.Module, base: dict[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in base.items():
            if value.shape != params[key].shape:
                raise AdapterLoadError(
                    f"base weight {key!r} in the adapter file has shape {tuple(value.shape)}, "
                    f"the model's has {tuple(params[key].shape)}; resize the model first."
                )
            params[key].copy_(value)
