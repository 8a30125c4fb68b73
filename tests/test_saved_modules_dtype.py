"""``modules_to_save`` follow the adapters' dtype rule (issue 19, item 5): on a bfloat16
base a trained head is float32 by default (``adapter_dtype="base"``: bfloat16), computes
from a float32 input and gives the base's dtype to the layers after it, with or without
autocast; the copies for samples without an adapter stay the base's; conversions, files,
resumes, PEFT and merged exports keep it. The DoRA magnitude follows the same rule."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from _helpers import assert_close_fp32
from _tiny import NetTraining, sign_data
from torch import nn

from lora_lightning import (
    LoRACallback,
    LoRAConfig,
    disable_adapters,
    inject_lora,
    load_adapter,
    load_lora_checkpoint,
    merged_state_dict,
    per_sample_adapters,
    save_adapter,
    unload_lora,
)

pytestmark = pytest.mark.usefixtures("one_thread")
BF16 = torch.bfloat16


class Net(nn.Module):
    """``fc -> head -> out``: the head (a ``modules_to_save``) has a layer after it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.relu(self.head(torch.relu(self.fc(x)))))


def injected(rule: str | None = None, **kw) -> tuple[Net, Net]:
    """(a bf16 model with LoRA on fc and out and ``head`` to save, the same base plain)."""
    base = Net().to(BF16)
    model = copy.deepcopy(base)
    inject_lora(model, LoRAConfig(r=2, target_modules=["fc", "out"], modules_to_save=["head"],
                                  adapter_dtype=rule, **kw))
    return model, base


X = torch.randn(6, 8, generator=torch.Generator().manual_seed(1)).to(BF16)


def randomize(model: Net) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize(("rule", "want"), [(None, torch.float32), ("base", BF16)])
def test_a_head_on_a_bf16_base_takes_the_adapters_dtype_and_gives_the_base_s(rule, want):
    model, base = injected(rule)
    assert model.head.weight.dtype == model.head.bias.dtype == want
    assert model.fc.lora_A.dtype == want and model.fc.weight.dtype == BF16
    assert model.head.weight.requires_grad and not model.fc.weight.requires_grad
    assert isinstance(model.head, nn.Linear)
    seen = []
    model.out.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            y = model(X)
        assert y.dtype == BF16 and seen[-1] == BF16  # the layer after the head got bf16
        with torch.no_grad(), torch.autocast("cpu", dtype=BF16, enabled=autocast):
            # adapters and head start as the base's (B = 0, the head a copy): same output
            torch.testing.assert_close(y, base(X), rtol=2e-2, atol=2e-2)
    # the copies used without an adapter are the base's own
    with disable_adapters(model), torch.no_grad():
        assert model.head.weight.dtype == BF16 and type(model.head) is nn.Linear
        assert torch.equal(model(X), base(X))


@pytest.mark.parametrize("autocast", [False, True])
def test_a_float32_head_trains_where_a_bf16_head_cannot(autocast):
    """With a learning rate whose updates fall under bf16's resolution at the head's
    weights, the bf16 head (adapter_dtype="base") stays unchanged and the float32 one
    trains; the gradient reaches it in its own dtype."""
    moved = {}
    for rule, want in ((None, torch.float32), ("base", BF16)):
        model, _ = injected(rule)
        with torch.no_grad():
            model.head.weight.fill_(1.0)
        start = model.head.weight.detach().clone()
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            y = model(X)
        y.float().sum().backward()
        grad = model.head.weight.grad
        assert grad.dtype == want and grad.abs().sum() > 0
        torch.optim.SGD([model.head.weight], lr=1e-5).step()
        moved[rule] = not torch.equal(model.head.weight.detach(), start)
    assert moved == {None: True, "base": False}


def test_converting_the_model_keeps_the_head_s_dtype_and_follows_the_base():
    model, _ = injected()
    model.to(BF16)  # what Lightning's "bf16-true" does
    assert model.head.weight.dtype == torch.float32 and model.fc.lora_A.dtype == torch.float32
    assert model(X).dtype == BF16
    model.float()  # a float32 base: the head computes and gives float32
    assert model.head.weight.dtype == torch.float32 and model(X.float()).dtype == torch.float32
    model.half()
    assert model.head.weight.dtype == torch.float32 and model(X.half()).dtype == torch.float16
    model.to(BF16)
    assert model.head.weight.dtype == torch.float32 and model(X).dtype == BF16
    # another adapter's copy of the head, and its own rule
    inject_lora(model, LoRAConfig(r=2, target_modules=["fc"], modules_to_save=["head"],
                                  adapter_dtype="base"), adapter="other")
    assert model.head.weight.dtype == BF16 and model.fc.lora_A_other.dtype == BF16


def test_per_sample_heads_give_none_samples_the_base_head():
    model, base = injected()
    randomize(model)
    with torch.no_grad():
        adapted = model(X)
        names = ["default", None, "default", None, None, "default"]
        with per_sample_adapters(model, names):
            mixed = model(X)
    assert mixed.dtype == BF16
    rows = torch.tensor([n is None for n in names])
    with torch.no_grad():
        assert torch.equal(mixed[rows], base(X)[rows])
        # another path (the batched one) to the same values: bf16 rounding apart
        torch.testing.assert_close(mixed[~rows], adapted[~rows], rtol=3e-2, atol=3e-2)


def test_merged_exports_unload_and_adapter_files_keep_the_head(tmp_path):
    model, base = injected()
    randomize(model)
    with torch.no_grad():
        y = model(X)
    # merged: every tensor in the base's dtype, loads strict into the plain model
    merged = merged_state_dict(model)
    assert {v.dtype for v in merged.values()} == {BF16}
    plain = copy.deepcopy(base)
    plain.load_state_dict(merged, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(X), y, rtol=3e-2, atol=3e-2)
    # the adapter directory keeps the float32 head exactly
    save_adapter(model, tmp_path / "a")
    fresh = load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert fresh.head.weight.dtype == torch.float32
    assert torch.equal(fresh.head.weight, model.head.weight)
    with torch.no_grad():
        assert torch.equal(fresh(X), y)
    # PEFT keeps modules_to_save in the base's dtype: its load casts the float32 values
    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(X), y, rtol=3e-2, atol=3e-2)
    # unload: the plain type back, in the base's dtype
    unload_lora(model)
    assert type(model.head) is nn.Linear and model.head.weight.dtype == BF16
    with torch.no_grad():
        torch.testing.assert_close(model(X), y, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize(("rule", "want"), [(None, torch.float32), ("base", BF16)])
def test_the_dora_magnitude_follows_the_rule_and_conversions(rule, want):
    model, _ = injected(rule, use_dora=True)
    assert model.fc.lora_magnitude.dtype == want
    model.to(BF16)
    assert model.fc.lora_magnitude.dtype == want
    y = model(X)
    assert y.dtype == BF16
    y.float().sum().backward()
    assert model.fc.lora_magnitude.grad.dtype == want


# -- through the Trainer --------------------------------------------------------------
class Module(NetTraining, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = Net()


def trainer(root, epochs: int, precision: str = "bf16-true", rule=None) -> L.Trainer:
    cfg = LoRAConfig(r=2, target_modules=["fc", "out"], modules_to_save=["head"],
                     adapter_dtype=rule)
    return L.Trainer(max_epochs=epochs, accelerator="cpu", precision=precision, logger=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, default_root_dir=root,
                     callbacks=[LoRACallback(cfg, verbose=False)])


@pytest.mark.parametrize(("rule", "want"), [(None, torch.float32), ("base", BF16)])
def test_bf16_true_trains_saves_resumes_and_loads_the_head_in_its_dtype(tmp_path, rule, want):
    module = Module()
    start = module.net.head.weight.detach().clone()
    t = trainer(tmp_path, 1, rule=rule)
    t.fit(module, sign_data())
    head = module.net.head
    assert module.net.fc.weight.dtype == BF16 and head.weight.dtype == want
    assert not torch.equal(head.weight.detach().float(), start)  # trained
    assert {s["exp_avg"].dtype for s in t.optimizers[0].state.values()} == {want}
    path = tmp_path / "a.ckpt"
    t.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["state_dict"]
    assert saved["net.head.weight"].dtype == want and "net.fc.weight" not in saved
    # resume: one more epoch from the file equals two epochs in a row
    straight = Module()
    trainer(tmp_path, 2, rule=rule).fit(straight, sign_data())
    resumed = Module()
    trainer(tmp_path, 2, rule=rule).fit(resumed, sign_data(), ckpt_path=path)
    assert resumed.net.head.weight.dtype == want
    for key, value in straight.state_dict().items():
        assert_close_fp32(resumed.state_dict()[key].float(), value.float())
    loaded = load_lora_checkpoint(Module().to(BF16), path)
    assert loaded.net.head.weight.dtype == want
    assert torch.equal(loaded.net.head.weight, head.weight)
    x = torch.randn(4, 8).to(BF16)
    with torch.no_grad():
        assert torch.equal(loaded(x), module.eval()(x))


def test_converting_the_model_never_rounds_float32_adapters_or_heads():
    """``model.to(bfloat16)`` puts the adapters and the head back from their float32 values,
    not through bf16 (a resume under "bf16-true" restores them before the conversion)."""
    model, _ = injected()
    randomize(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.to(BF16)
    model.to(BF16)
    for n, p in model.named_parameters():
        if n in before:
            assert p.dtype == torch.float32 and torch.equal(p.detach(), before[n]), n


def test_a_model_with_a_float32_head_pickles_and_copies():
    """The head's class is made at run time; ``torch.save(model)`` and deepcopy rebuild it."""
    import io

    model, _ = injected()
    randomize(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (torch.load(buf, weights_only=False), copy.deepcopy(model)):
        assert type(other.head) is type(model.head) and other.head.weight.dtype == torch.float32
        with torch.no_grad():
            assert torch.equal(other(X), model(X))


def test_lora_on_another_adapter_s_float32_head_is_refused_naming_the_fix():
    from lora_lightning.errors import UnsupportedModuleError

    model, _ = injected()
    with pytest.raises(UnsupportedModuleError, match="adapter_dtype='base'"):
        inject_lora(model, LoRAConfig(r=2, target_modules=["head"]), adapter="other")
    assert model.head.weight.dtype == torch.float32 and "other" not in model.head.__dict__
    plain, _ = injected("base")  # a head in the base's dtype takes an adapter
    report = inject_lora(plain, LoRAConfig(r=2, target_modules=["head"]), adapter="other")
    assert report.injected == ["head"] and plain(X).dtype == BF16


def test_on_a_float32_base_a_head_under_autocast_gives_what_the_plain_head_gives():
    """Nothing to cast back where the head keeps the base's dtype: under bf16 autocast the
    head's output stays bf16, as the plain module's."""
    base = Net()
    model = copy.deepcopy(base)
    inject_lora(model, LoRAConfig(r=2, target_modules=["fc"], modules_to_save=["head"]))
    x = torch.randn(3, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        got, want = model.head(x), base.head(x)
    assert got.dtype == want.dtype == BF16 and torch.equal(got, want)
