"""Tiny real architectures for ``test_architectures.py``: each built from a small config with
random weights and a fixed seed (no hub), with a fixed input and the targets to adapt.

A case's ``targets`` are its attention projections (or, for the CNN and the embedding model,
its conv / embedding layers); ``all_linear`` adds an ``"all-linear"`` variant. ``xfail`` maps
a check name (or ``"*"`` for every check) to the issue-8 item that makes it fail today.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

H = 16  # hidden size of every tiny model
VOCAB = 64


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, Tensor]]
    targets: list[str] | str
    all_linear: bool = False
    hf: bool = True
    peft_forward: bool = True
    """False where PEFT computes this model's adapted forward wrongly (then PEFT files are
    compared tensor by tensor and gradients against the merged-weight math instead)."""
    peft_train_mode: bool = False
    """Compare with PEFT in train mode (every dropout is 0): PEFT's own adapters are bypassed
    by torch's eval-mode fast path (issue 8 item 1 is PEFT's bug too)."""
    tied: bool = False
    """An adapted weight is tied to another module (merging may refuse, naming 'tied')."""
    xfail: dict[str, str] = field(default_factory=dict)
    xfail_all_linear: dict[str, str] = field(default_factory=dict)
    """Extra xfail entries for the ``"all-linear"`` variant only."""

    @property
    def peft_all_linear(self) -> bool:
        return self.hf  # nn.MultiheadAttention's out_proj makes PEFT's all-linear ill-defined


def _ids(batch: int = 2, length: int = 6, seed: int = 0, vocab: int = VOCAB) -> Tensor:
    # ids >= 2 so no token is a padding id
    return torch.randint(2, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def text(**extra: Any) -> Callable[[], dict[str, Tensor]]:
    return lambda: {"input_ids": _ids(), **{k: v() for k, v in extra.items()}}


def seq2seq() -> dict[str, Tensor]:
    return {"input_ids": _ids(), "decoder_input_ids": _ids(length=4, seed=1)}


def _hf(model_cls: str, config_cls: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        config = getattr(transformers, config_cls)(**kw)
        return getattr(transformers, model_cls)(config)

    return build


BERTISH = dict(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               vocab_size=VOCAB, max_position_embeddings=40, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
DECODER = dict(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
               intermediate_size=32, vocab_size=VOCAB, max_position_embeddings=32,
               pad_token_id=0, bos_token_id=1, eos_token_id=1)
BARTISH = dict(d_model=H, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
               vocab_size=VOCAB, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0,
               activation_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=1,
               decoder_start_token_id=1, forced_eos_token_id=1)

PEFT_MHA = ("PEFT 0.21.2 applies an nn.MultiheadAttention out_proj adapter twice (checked against "
            "W + scale*B*A on both projections, which ours matches)")
ITEM1 = ("issue 8 item 1: torch's eval-mode fast path in nn.TransformerEncoderLayer reads the "
         "frozen weights directly and bypasses the adapters")
ITEM2 = "issue 8 item 2: nn.MultiheadAttention cannot be adapted"
ITEM3 = ("issue 8 item 3: PEFT's default save of an 'embed_tokens' adapter holds "
         "embed_tokens.base_layer.weight, which load_adapter refuses")
ITEM4 = "issue 8 item 4: merging into a tied weight silently changes the module tied to it"
ITEM6_HEAD = "issue 8 item 6: all-linear adapts RoBERTa's classifier.dense / classifier.out_proj"
ITEM6_SUB = "issue 8 item 6: nn.Linear subclasses (FalconLinear) are refused / skipped silently"


# -- non-HF models --------------------------------------------------------------------
class TorchEncoder(nn.Module):
    """torch's nn.TransformerEncoder, batch first, no dropout."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(H, 2, dim_feedforward=32, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    def forward(self, src: Tensor) -> Tensor:
        return self.encoder(src)


def lightning_demo() -> nn.Module:
    from lightning.pytorch.demos import Transformer

    return Transformer(vocab_size=32, ninp=H, nhead=2, nhid=32, nlayers=1, dropout=0.0)


class DilatedCNN(nn.Module):
    """Convolutions with dilation and non-zero padding modes, then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3, padding=2, dilation=2, padding_mode="circular")
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, padding_mode="reflect")
        self.c3 = nn.Conv2d(8, 8, (3, 1), stride=(2, 1), padding=(1, 0),
                            padding_mode="replicate")
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.c1(x))  # (B, 8, L)
        h = torch.tanh(self.c2(h.unsqueeze(-1).expand(-1, -1, -1, 5)))  # (B, 8, L, 5)
        h = torch.tanh(self.c3(h))
        return self.head(h.mean((2, 3)))


class EmbeddingModel(nn.Module):
    """A bag-of-embeddings classifier whose embedding is named as in HF decoders."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, H, padding_idx=0)
        self.proj = nn.Linear(H, H)
        self.out = nn.Linear(H, 3)

    def get_input_embeddings(self) -> nn.Module:  # as HF models have (PEFT's save uses it)
        return self.embed_tokens

    def get_output_embeddings(self) -> None:
        return None

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.out(torch.tanh(self.proj(self.embed_tokens(input_ids))).mean(1))


CASES: list[Case] = [
    Case("gpt2", _hf("GPT2LMHeadModel", "GPT2Config", n_embd=H, n_layer=1, n_head=2,
                     vocab_size=VOCAB, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=1, eos_token_id=1),
         text(), ["c_attn", "c_proj"], all_linear=True),
    Case("gpt2_tied_wte", _hf("GPT2LMHeadModel", "GPT2Config", n_embd=H, n_layer=1, n_head=2,
                              vocab_size=VOCAB, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                              attn_pdrop=0.0, bos_token_id=1, eos_token_id=1),
         text(), ["c_attn", "wte"], tied=True),
    Case("bert", _hf("BertModel", "BertConfig", **BERTISH), text(), ["query", "value"],
         all_linear=True),
    Case("roberta_cls", _hf("RobertaForSequenceClassification", "RobertaConfig", **BERTISH,
                            num_labels=3, pad_token_id=1),
         text(), ["query", "key", "value"], all_linear=True),
    Case("distilbert", _hf("DistilBertModel", "DistilBertConfig", dim=H, n_layers=1, n_heads=2,
                           hidden_dim=32, vocab_size=VOCAB, max_position_embeddings=32,
                           dropout=0.0, attention_dropout=0.0),
         text(), ["q_lin", "v_lin"]),
    Case("albert_shared_layers", _hf("AlbertModel", "AlbertConfig", embedding_size=8,
                                     **{**BERTISH, "num_hidden_layers": 2}),
         text(), ["query", "value"]),  # one layer module called twice
    Case("deberta_v2", _hf("DebertaV2Model", "DebertaV2Config", **BERTISH), text(),
         ["query_proj", "value_proj"]),
    Case("t5", _hf("T5Model", "T5Config", d_model=H, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                   vocab_size=VOCAB, dropout_rate=0.0, decoder_start_token_id=0),
         seq2seq, ["q", "v"], all_linear=True),
    Case("bart", _hf("BartModel", "BartConfig", **BARTISH), seq2seq, ["q_proj", "v_proj"],
         all_linear=True),
    Case("whisper", _hf("WhisperModel", "WhisperConfig", **{
        **{k: v for k, v in BARTISH.items() if k != "max_position_embeddings"},
        "num_mel_bins": 8, "max_source_positions": 8, "max_target_positions": 16,
        "forced_eos_token_id": None}),
         lambda: {"input_features": _randn(1, 8, 16),
                  "decoder_input_ids": _ids(batch=1, length=4, seed=1)},
         ["q_proj", "v_proj"], all_linear=True),
    Case("llama_lm", _hf("LlamaForCausalLM", "LlamaConfig", **DECODER), text(),
         ["q_proj", "k_proj", "v_proj", "o_proj"], all_linear=True),
    Case("mistral", _hf("MistralModel", "MistralConfig", **DECODER), text(),
         ["q_proj", "v_proj"]),
    Case("qwen2", _hf("Qwen2Model", "Qwen2Config", **DECODER), text(), ["q_proj", "v_proj"]),
    Case("gemma", _hf("GemmaModel", "GemmaConfig", **DECODER, head_dim=8), text(),
         ["q_proj", "v_proj"]),
    Case("phi3", _hf("Phi3Model", "Phi3Config", **DECODER), text(), ["qkv_proj", "o_proj"]),
    Case("gpt_neox", _hf("GPTNeoXModel", "GPTNeoXConfig", **{
        k: v for k, v in DECODER.items() if k != "num_key_value_heads"}),
         text(), ["query_key_value", "dense"]),
    Case("opt", _hf("OPTModel", "OPTConfig", hidden_size=H, num_hidden_layers=1,
                    num_attention_heads=2, ffn_dim=32, vocab_size=VOCAB,
                    max_position_embeddings=32, word_embed_proj_dim=H, dropout=0.0,
                    attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=1),
         text(), ["q_proj", "v_proj"]),
    Case("falcon", _hf("FalconModel", "FalconConfig", hidden_size=H, num_hidden_layers=1,
                       num_attention_heads=2, vocab_size=VOCAB, hidden_dropout=0.0,
                       attention_dropout=0.0, bos_token_id=1, eos_token_id=1),
         text(), ["query_key_value", "dense"], all_linear=True, xfail={"*": ITEM6_SUB}),
    Case("vit_cls", _hf("ViTForImageClassification", "ViTConfig", hidden_size=H,
                        num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        image_size=8, patch_size=4, num_labels=3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0),
         lambda: {"pixel_values": _randn(2, 3, 8, 8)}, ["q_proj", "v_proj"], all_linear=True),
    Case("clip_text", _hf("CLIPTextModel", "CLIPTextConfig", hidden_size=H, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=32, vocab_size=VOCAB,
                          max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
                          eos_token_id=1),
         text(), ["q_proj", "v_proj"]),
    # -- torch and Lightning ----------------------------------------------------------
    Case("torch_encoder_ffn", TorchEncoder, lambda: {"src": _randn(2, 5, H)},
         ["linear1", "linear2"], all_linear=True, hf=False, peft_train_mode=True),
    Case("torch_encoder_mha", TorchEncoder, lambda: {"src": _randn(2, 5, H)}, ["self_attn"],
         hf=False, peft_train_mode=True,
         xfail={"peft_files": PEFT_MHA, "grads": PEFT_MHA}),
    Case("lightning_demo_ffn", lightning_demo,
         lambda: {"inputs": _ids(vocab=32), "target": _ids(vocab=32, seed=1)},
         ["linear1", "linear2"], all_linear=True, hf=False, peft_train_mode=True),
    Case("lightning_demo_mha", lightning_demo,
         lambda: {"inputs": _ids(vocab=32), "target": _ids(vocab=32, seed=1)},
         ["self_attn", "multihead_attn"], hf=False, peft_train_mode=True,
         xfail={"peft_files": PEFT_MHA, "grads": PEFT_MHA}),
    Case("cnn_dilated_padding_modes", DilatedCNN, lambda: {"x": _randn(2, 3, 9)},
         ["c1", "c2", "c3"], hf=False, peft_forward=False),
    Case("embedding", EmbeddingModel, text(), ["embed_tokens", "proj"], hf=False),
]


def flat_output(out: Any) -> Tensor:
    """Every floating tensor a model returns (a ModelOutput's tensor fields, e.g. BERT's
    pooler output too), flattened into one vector."""
    if isinstance(out, Tensor):
        return out.flatten()
    values = out.values() if hasattr(out, "values") else out
    parts = [v.flatten() for v in values if isinstance(v, Tensor) and v.is_floating_point()]
    return torch.cat(parts)


def loss_weights(y: Tensor) -> Tensor:
    """A fixed random projection, so the loss weighs every output element differently."""
    return torch.randn(y.shape, generator=torch.Generator().manual_seed(7)) / math.sqrt(y.numel())
