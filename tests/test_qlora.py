"""QLoRA (issue 21): LoRA on a frozen base stored by bitsandbytes in 4 bits (NF4, FP4) or 8
bits, all on CPU with tiny models.

A quantized base computes ``W_q x`` with ``W_q`` the dequantized weight, so every output is
compared with a dense reference model holding ``W_q`` (float32 tolerances: the same math,
another kernel), and the 4-bit rounding itself is bounded where it matters (merging back
into 4 bits)."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from _helpers import (
    assert_close_fp32,
    assert_unchanged,
    loaded_benchmark,
    randomize_adapters,
    snapshot_model,
)
from torch import nn

from lora_lightning import (
    LoRAConfig,
    MissingDependencyError,
    QuantizedMergeError,
    UnsupportedModuleError,
    adapter_state_dict,
    base_fingerprint,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    merged_state_dict,
    save_adapter,
    unload_lora,
    unmerge_lora,
)
from lora_lightning.errors import ConfigError

bnb = pytest.importorskip("bitsandbytes")

pytestmark = pytest.mark.usefixtures("one_thread")
QUANT_KEYS = ("weight.absmax", "weight.quant_map", "weight.nested_absmax",
              "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4")


class Net(nn.Module):
    """An embedding, two Linear layers to adapt and a head to train fully."""

    def __init__(self, width: int = 64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(10, width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def config(kind: str | None = "nf4", **kwargs) -> LoRAConfig:
    kwargs.setdefault("target_modules", ["fc1", "fc2"])
    kwargs.setdefault("modules_to_save", ["head"])
    return LoRAConfig(r=4, alpha=8, quantize_base=kind, **kwargs)


def dense_reference(qmodel: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """A dense model with the quantized layers' dequantized weights and the same adapters."""
    ref = Net()
    for name, layer in lora_layers(qmodel).items():
        with torch.no_grad():
            ref.get_submodule(name).weight.copy_(layer.dense_weight())
    dense_cfg = LoRAConfig(**{**cfg.to_dict(), "quantize_base": None})
    inject_lora(ref, dense_cfg)
    ref.load_state_dict(adapter_state_dict(qmodel), strict=False)
    return ref


def x_input(n: int = 6, width: int = 64) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(1))


# -- 1. quantize_base at injection --------------------------------------------------------
@pytest.mark.parametrize(("kind", "bnb_type", "ratio"), [
    ("nf4", "Linear4bit", 7), ("fp4", "Linear4bit", 7), ("int8", "Linear8bitLt", 3.5)])
def test_quantize_base_replaces_only_adapted_linears_and_matches_the_dequantized_model(
        kind, bnb_type, ratio):
    model = Net()
    dense_bytes = model.fc1.weight.numel() * 4
    report = inject_lora(model, config(kind))
    assert report.by_type == {bnb_type: 2}
    for name in ("fc1", "fc2"):
        layer = model.get_submodule(name)
        assert isinstance(layer, getattr(bnb.nn, bnb_type))
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
        assert not layer.weight.requires_grad and layer.lora_A.requires_grad
        stored = layer.weight.numel() * layer.weight.element_size()
        assert dense_bytes / stored >= ratio  # 8x (4-bit) / 4x (int8) smaller, plus stats
    if kind != "int8":
        assert model.fc1.weight.quant_type == kind and model.fc1.weight.compress_statistics
        assert model.fc1.compute_dtype == torch.float32
    # stay dense (the head, a modules_to_save, is a subclass keeping its own dtype)
    assert isinstance(model.head, nn.Linear) and type(model.emb) is nn.Embedding
    assert not isinstance(model.head, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    assert report.params.total == sum(p.numel() for p in Net().parameters()) + sum(
        layer.lora_A.numel() + layer.lora_B.numel() for layer in lora_layers(model).values())
    randomize_adapters(model)
    ref = dense_reference(model, config(kind))
    x = x_input().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    assert_close_fp32(model(x), ref(x_ref))
    model(x).square().sum().backward()
    ref(x_ref).square().sum().backward()
    assert_close_fp32(x.grad, x_ref.grad)  # gradients flow through the 4-bit base
    assert_close_fp32(model.fc1.lora_A.grad, ref.fc1.lora_A.grad)
    assert model.fc1.lora_B.grad.abs().sum() > 0


def test_quantizing_is_deterministic_and_the_fingerprint_is_the_dense_bases():
    a, b, dense = Net(), Net(), Net()
    inject_lora(a, config())
    inject_lora(b, config())
    sa, sb = a.state_dict(), b.state_dict()
    assert set(QUANT_KEYS) <= {k.removeprefix("fc1.") for k in sa}
    for key in sa:
        if "lora_" not in key:
            assert torch.equal(sa[key], sb[key]), key
    inject_lora(dense, config(None))
    assert base_fingerprint(a) == base_fingerprint(dense)
    other = Net(seed=1)
    inject_lora(other, config())
    assert base_fingerprint(other) != base_fingerprint(a)


def test_a_quantized_layer_trains_after_an_eval_pass_without_autograd():
    """bitsandbytes repacks a 4-bit weight for CPU inference (AVX512-BF16) on an eval pass
    without autograd, after which a forward with autograd fails; adapted layers keep the
    trainable layout, so validation then training works."""
    model = Net()
    inject_lora(model, config())
    randomize_adapters(model)
    x = x_input()
    model.eval()
    with torch.no_grad():
        before = model(x)
    model.train()
    out = model(x.requires_grad_(True))
    out.sum().backward()
    assert x.grad.abs().sum() > 0
    assert_close_fp32(out, before)


# -- 2. models already quantized ----------------------------------------------------------
def test_a_model_holding_bitsandbytes_linears_gets_adapters_that_train_and_save(tmp_path):
    from lora_lightning.quantize import quantize_linear

    def quantized_net() -> Net:
        net = Net()
        net.fc1, net.fc2 = quantize_linear(net.fc1, "nf4"), quantize_linear(net.fc2, "nf4")
        return net

    model = quantized_net()
    report = inject_lora(model, config(None))
    assert report.by_type == {"Linear4bit": 2}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(x_input()).square().mean().backward()
        opt.step()
    assert model.fc1.lora_B.abs().sum() > 0
    state = adapter_state_dict(model)
    assert not any(k.startswith(("fc1.weight", "fc2.weight")) for k in state)
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(quantized_net(), tmp_path / "a")
    assert torch.equal(loaded(x_input()), model(x_input()))


# -- 3. merge and export ------------------------------------------------------------------
def test_merging_into_4_bits_is_refused_unless_asked_and_exports_are_dense():
    model = Net()
    inject_lora(model, config())
    randomize_adapters(model, std=0.05)
    x = x_input()
    want = model(x).detach()
    before = snapshot_model(model)
    with pytest.raises(QuantizedMergeError, match="4 bits") as err:
        merge_lora(model)
    assert err.value.layers == ["fc1", "fc2"] and "requantize=True" in str(err.value)
    assert_unchanged(model, before)

    state = merged_state_dict(model)  # dense float32, no quantization state
    plain = Net(seed=5)
    plain.load_state_dict(state, strict=True)
    assert_close_fp32(plain(x), want)
    half = merged_state_dict(model, dtype=torch.bfloat16)
    assert {v.dtype for v in half.values()} == {torch.bfloat16}

    requantized = copy.deepcopy(model)
    merge_lora(requantized, requantize=True)
    assert isinstance(requantized.fc1, bnb.nn.Linear4bit) and requantized.fc1.merged
    err_4bit = (requantized(x) - want).abs().max()
    assert 0 < err_4bit < 0.25 * want.abs().max()  # rounded to the 4-bit grid, not lost
    unmerge_lora(requantized)

    dense = copy.deepcopy(model)
    merge_lora(dense, dequantize=True)
    assert type(dense.fc1).__name__ == "LoRALinear" and dense.fc1.weight.dtype == torch.float32
    assert_close_fp32(dense(x), want)

    unloaded = unload_lora(copy.deepcopy(model), merge=True)
    assert type(unloaded.fc1) is nn.Linear and unloaded.fc1.weight.dtype == torch.float32
    assert_close_fp32(unloaded(x), want)
    kept = unload_lora(copy.deepcopy(model), merge=False)
    assert type(kept.fc1) is bnb.nn.Linear4bit


# -- 4. checkpoints -----------------------------------------------------------------------
@pytest.mark.parametrize("save", ["adapter", "full"])
def test_trainer_resume_from_a_qlora_checkpoint_is_exact(tmp_path, save):
    import lightning as L
    from _tiny import TinyTraining
    from torch.utils.data import DataLoader, TensorDataset

    from lora_lightning import LoRACallback, load_lora_checkpoint

    class Mod(TinyTraining, L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.fc2, self.head = nn.Linear(8, 64), nn.Linear(64, 64), nn.Linear(64, 2)

        def validation_step(self, batch, _):  # an eval pass without autograd first
            self.log("val", self.training_step(batch, 0))

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g)
    data = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)
    cfg = LoRAConfig(r=2, target_modules=["fc1", "fc2"], modules_to_save=["head"],
                     quantize_base="nf4")

    def trainer(epochs: int) -> L.Trainer:
        return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[LoRACallback(cfg, save_mode=save, verbose=False)])

    reference = Mod()
    trainer(2).fit(reference, data, data)
    first = Mod()
    t = trainer(1)
    t.fit(first, data, data)
    path = tmp_path / "qlora.ckpt"
    t.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    keys = set(saved["state_dict"])
    if save == "adapter":  # adapters and head only: no packed weight, no quantization state
        assert keys == set(adapter_state_dict(first))
    else:  # the packed weights, not the quantization state torch's strict load refuses
        assert {"fc1.weight", "fc2.weight"} <= keys
        assert keys == {k for k in first.state_dict() if ".weight." not in k}
    resumed = Mod()
    trainer(2).fit(resumed, data, data, ckpt_path=path)
    for key, value in adapter_state_dict(reference).items():
        assert_close_fp32(adapter_state_dict(resumed)[key], value, msg=key)

    merged = load_lora_checkpoint(Mod, path, merge=True)
    assert type(merged.fc1).__name__ == "LoRALinear" and merged.fc1.merged
    assert_close_fp32(merged(x), first(x))


# -- 5. PEFT ------------------------------------------------------------------------------
def test_adapters_round_trip_with_peft_on_the_same_bitsandbytes_base(tmp_path):
    peft = pytest.importorskip("peft")
    from lora_lightning.quantize import quantize_linear

    def quantized_net() -> Net:
        net = Net()
        net.fc1, net.fc2 = quantize_linear(net.fc1, "nf4"), quantize_linear(net.fc2, "nf4")
        net.is_loaded_in_4bit = True  # what transformers sets; PEFT picks its bnb layers by it
        return net

    peft_cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"],
                               init_lora_weights=False)
    theirs = peft.get_peft_model(quantized_net(), peft_cfg)
    assert type(theirs.base_model.model.fc1) is peft.tuners.lora.bnb.Linear4bit
    x = x_input().requires_grad_(True)  # keeps bitsandbytes' training kernel on both sides
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(quantized_net(), tmp_path / "peft")
    assert_close_fp32(ours(x), theirs(x))

    mine = quantized_net()
    inject_lora(mine, config(None, modules_to_save=None))
    randomize_adapters(mine)
    save_adapter(mine, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(quantized_net(), tmp_path / "ours", is_trainable=True)
    assert type(back.base_model.model.fc1) is peft.tuners.lora.bnb.Linear4bit
    assert_close_fp32(back(x), mine(x))


# -- 6. bad input -------------------------------------------------------------------------
def test_quantize_base_is_validated_in_the_config():
    with pytest.raises(ConfigError, match="quantize_base.*'nf4'"):
        LoRAConfig(quantize_base="int4")


def test_without_bitsandbytes_the_error_names_the_install_command(monkeypatch):
    model = Net()
    before = snapshot_model(model)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes fails
    with pytest.raises(MissingDependencyError, match=r"pip install 'lora-lightning\[qlora\]'"):
        inject_lora(model, config())
    assert_unchanged(model, before)


@pytest.mark.parametrize("case", ["conv", "float64"])
def test_an_unsupported_layer_or_dtype_is_refused_before_any_change(case):
    model = Net()
    if case == "conv":
        model.fc2 = nn.Conv1d(64, 64, 1)
        match = "nn.Linear layers only"
    else:
        model.fc2.double()
        match = "float64 weight"
    before = snapshot_model(model)
    with pytest.raises(UnsupportedModuleError, match=match) as err:
        inject_lora(model, config())
    assert err.value.name == "fc2"
    assert_unchanged(model, before)  # fc1 was not quantized either


def test_dora_on_a_4bit_base_uses_the_dequantized_norm():
    model = Net()
    cfg = config(use_dora=True)
    inject_lora(model, cfg)
    assert_close_fp32(model.fc1.lora_magnitude, model.fc1.dense_weight().norm(dim=1))
    randomize_adapters(model)
    ref = dense_reference(model, cfg)
    x = x_input()
    assert_close_fp32(model(x), ref(x))


# -- a tiny HF Llama ----------------------------------------------------------------------
def test_a_tiny_llama_trains_on_a_4bit_base_and_exports_a_plain_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    report = inject_lora(model, LoRAConfig(r=4, target_modules="all-linear",
                                           quantize_base="nf4"))
    assert report.by_type == {"Linear4bit": 7}  # q k v o gate up down; lm_head stays dense
    assert type(model.lm_head) is nn.Linear
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(m.lora_A.grad is not None for m in lora_layers(model).values())
    randomize_adapters(model, std=0.05)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    plain = transformers.LlamaForCausalLM(cfg)
    plain.load_state_dict(merged_state_dict(model), strict=True)
    with torch.no_grad():
        assert_close_fp32(plain(input_ids=ids).logits, want)


def test_a_llama_loaded_in_4bit_by_transformers_is_adapted_as_it_is(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True,
                                            bnb_4bit_compute_dtype=torch.float32)
    model = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=quant, device_map="cpu")
    report = inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert report.by_type == {"Linear4bit": 2}
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_B.grad.abs().sum() > 0
    state = adapter_state_dict(model)
    assert sorted(state) == sorted(f"model.layers.0.self_attn.{p}_proj.lora_{ab}"
                                   for p in "qv" for ab in "AB")


# -- 7. the benchmark's smoke mode ---------------------------------------------------------
def test_the_qlora_benchmark_runs_in_its_cpu_smoke_mode(tmp_path):
    """``benchmarks/gpu/bench_qlora_gpu.py --device cpu --smoke`` runs
    ``benchmarks/bench_qlora.py``'s tiny preset: every row filled, and ours and PEFT
    compute the same loss on the same 4-bit base and adapters. No timing assertions."""
    for package in ("peft", "transformers"):
        pytest.importorskip(package)
    with loaded_benchmark("gpu/bench_qlora_gpu.py", "bench_qlora", "bench_lora") as module:
        text = module.main(["--device", "cpu", "--smoke", "--out", str(tmp_path / "r.md")])
    assert text == (tmp_path / "r.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| variant")}
    assert set(rows) == {"lora", "qlora", "peft"} and "n/a" not in text
    loss_gap = float(text.rsplit("adapters: ", 1)[1].split()[0])
    assert loss_gap < 1e-4
    ratio = float(text.split("frozen linear weights lora / qlora: ", 1)[1].split("x")[0])
    assert ratio > 4  # 4-bit weights plus their quantization state on 64-wide layers


def test_a_subclass_of_linear4bit_is_adapted_as_a_4bit_base():
    """bitsandbytes' ``LinearNF4`` is a ``Linear4bit`` before it is an ``nn.Linear``: the
    nearest registered type in its MRO adapts it."""
    net = Net()
    nf4 = bnb.nn.LinearNF4(64, 64, compute_dtype=torch.float32)
    from lora_lightning.layers import quantize_weight

    quantize_weight(nf4, net.fc1.weight.detach())
    nf4.bias = net.fc1.bias
    net.fc1 = nf4
    inject_lora(net, config(None, target_modules=["fc1"]))
    assert isinstance(net.fc1, bnb.nn.LinearNF4) and net.fc1.merge_loss is not None
    assert_close_fp32(net.fc1.dense_weight(), net.fc1.merged_weight())


def _probe(quantize: str | None, width: int = 64, hidden: int = 96, dropout: float = 0.0,
           bias: str = "none") -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))
    inject_lora(net, LoRAConfig(r=8, alpha=16, dropout=dropout, target_modules=["0", "2"],
                                quantize_base=quantize, bias=bias))
    randomize_adapters(net)
    return net.train()


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_one_node_4bit_path_equals_the_plain_4bit_ops(kind, dropout):
    """In training a 4-bit layer takes the one-node path (layers/fused.py) with bitsandbytes'
    own product: its output and gradients (input, A, B, trainable bias) equal the plain 4-bit
    ops on the same adapter values and the very dropout mask it drew."""
    from lora_lightning.layers import fused

    net = _probe(kind, dropout=dropout, bias="all")
    layer = net[0]
    x = torch.randn(3, 5, 64, requires_grad=True)
    assert layer._route(x, ["default"], False) == "fused"
    params = [x, layer.lora_A, layer.lora_B, layer.bias]
    assert all(p.requires_grad for p in params)
    torch.manual_seed(7)
    y = layer(x)
    if dropout:
        torch.manual_seed(7)  # the very mask the layer drew
        xd = x * fused.dropout_mask(x.reshape(-1, 64), dropout).reshape(x.shape) / (1 - dropout)
        ref = layer.base_forward(x) + layer.scaling * (xd @ layer.lora_A.T) @ layer.lora_B.T
    else:
        layer.fusable = lambda *_: False  # the plain ops: bitsandbytes' autograd + adapter
        assert layer._route(x, ["default"], False) == "in_place"
        ref = layer(x)
        del layer.fusable
    assert_close_fp32(y, ref)
    g = torch.randn_like(y)
    got, want = torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)
    for a, b in zip(got, want, strict=True):
        assert a.abs().max() > 0
        assert_close_fp32(a, b)


def _saved_bytes(net: nn.Module, x: torch.Tensor) -> tuple[int, int, list[torch.Tensor]]:
    """(all bytes saved for backward, those not held by the model, the saved tensors), each
    storage counted once."""
    saved: dict[int, int] = {}
    tensors: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        saved[s.data_ptr()] = s.nbytes()
        tensors.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = net(x)
    held = {t.untyped_storage().data_ptr() for t in [*net.parameters(), *net.buffers()]}
    y.sum().backward()
    return (sum(saved.values()), sum(n for p, n in saved.items() if p not in held), tensors)


def test_a_4bit_step_saves_no_more_than_dense_lora_plus_the_packed_weights():
    """The probe of issue 21 (576 -> 1536 -> 576, 1,024 tokens, r=8, dropout 0.05): the
    one-node 4-bit path saves the dense one-node path's activations and the packed 4-bit
    weights, never a dense copy of W (the plain 4-bit ops saved 3.9 MiB more)."""
    x = torch.randn(1024, 576)
    dense = _probe(None, 576, 1536, 0.05)
    dense_all, dense_act, _ = _saved_bytes(dense, x)
    dense_w = sum(dense[i].weight.untyped_storage().nbytes() for i in (0, 2))
    q = _probe("nf4", 576, 1536, 0.05)
    packed = sum(q[i].weight.untyped_storage().nbytes() for i in (0, 2))
    q_all, q_act, tensors = _saved_bytes(q, x)
    assert q_act <= dense_act  # the same activations (x, a bool mask, A x, the ReLU's)
    assert q_all <= dense_all - dense_w + packed  # and the packed weights in place of W
    shapes = {(1536, 576), (576, 1536)}  # a dense W, either way round
    assert not [t for t in tensors if t.is_floating_point() and tuple(t.shape) in shapes]
    assert [t for t in tensors if t.dtype == torch.uint8]  # the packed weights are saved
    for i in (0, 2):
        q[i].fusable = lambda *_: False
    plain_all, _, _ = _saved_bytes(q, x)
    assert q_all < plain_all - 2 * 2**20
