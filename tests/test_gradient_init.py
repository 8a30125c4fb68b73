"""``LoRAConfig(init="gradient")``: A from the first weight gradient, in plain PyTorch and
through ``LoRACallback`` (one process, gradient accumulation, resume, a second fit, DDP)."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from _fixture_module import FixtureModule
from _tiny import TinyNet, TinyTraining, sign_data
from torch import nn

from lora_lightning import (
    ArgumentError,
    ConfigError,
    LoRACallback,
    LoRAConfig,
    adapter_state_dict,
    inject_lora,
    lora_layers,
)
from lora_lightning import gradient_init as gi
from lora_lightning.gradient_init import ROW_NORM, GradientInit, top_right_singular_vectors

GRAD = LoRAConfig(r=2, alpha=4, target_modules=["fc1", "fc2"], init="gradient")


def _batch(n: int = 16):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] > 0).long()


def _weight_grads(model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    """Each adapted layer's weight gradient on (x, y), from a separate copy."""
    twin = copy.deepcopy(model)
    layers = lora_layers(twin)
    for layer in layers.values():
        layer.weight.requires_grad_(True)
    nn.functional.cross_entropy(twin(x), y).backward()
    return {n: layer.weight.grad.clone() for n, layer in layers.items()}


def _same_rows_span(a: torch.Tensor, vh: torch.Tensor) -> None:
    """``a``'s rows are ``vh``'s rows up to sign, at kaiming's row norm."""
    torch.testing.assert_close(a.norm(dim=1), torch.full((a.shape[0],), ROW_NORM))
    cos = (a / ROW_NORM) @ vh.T
    torch.testing.assert_close(cos.abs(), torch.eye(a.shape[0]), atol=1e-4, rtol=0)


def test_a_is_the_gradients_top_directions_and_b_gets_the_new_gradient():
    torch.manual_seed(0)
    model = TinyNet(16)
    inject_lora(model, GRAD)
    x, y = _batch()
    before = model(x).detach()
    grads = _weight_grads(model, x, y)
    init = GradientInit(model)
    init.start()
    nn.functional.cross_entropy(model(x), y).backward()
    report = init.finish()
    assert report.initialised == ["fc1", "fc2"] and report.kept == {}
    assert torch.equal(model(x).detach(), before)  # B = 0: the model is unchanged
    b_grads = {n: m.lora_B.grad.clone() for n, m in lora_layers(model).items()}
    for name, layer in lora_layers(model).items():
        assert not layer.weight.requires_grad and layer.weight.grad is None
        vh = torch.linalg.svd(grads[name], full_matrices=False).Vh[:2]
        _same_rows_span(layer.lora_A.detach(), vh)
    # B's gradient is the one a backward with the new A gives.
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(b_grads[name], layer.lora_B.grad, atol=1e-6, rtol=1e-5)
        assert not layer.lora_B.grad.eq(0).all()


class _Mixed(nn.Module):
    """A conv, a GPT-2 style Conv1D, an embedding and attention: every layer kind."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(10, 6)
        self.conv = nn.Conv1d(6, 6, 3, padding=1)
        self.proj = Conv1D(6, 6)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)

    def forward(self, tokens):
        h = self.conv(self.emb(tokens).transpose(1, 2)).transpose(1, 2)
        h = self.proj(h)
        return self.attn(h, h, h)[0].mean(1)


def test_conv_hf_conv1d_and_out_proj_get_b_gradients_as_autograd_others_keep_kaiming():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _Mixed()
    inject_lora(model, LoRAConfig(r=2, target_modules=["emb", "conv", "proj", "attn"],
                                  init="gradient"))
    tokens = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(0))
    target = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    kept_a = {n: m.lora_A.detach().clone() for n, m in lora_layers(model).items()}
    init = GradientInit(model)
    assert set(init.layers) == {"conv", "proj", "attn.out_proj"}
    assert set(init.skipped) == {"emb", "attn"}
    assert "does not start as B·A with B = 0" in init.skipped["emb"]
    init.start()
    nn.functional.mse_loss(model(tokens), target).backward()
    report = init.finish()
    assert sorted(report.initialised) == ["attn.out_proj", "conv", "proj"]
    assert set(report.kept) == {"emb", "attn"} and "kept the A they were injected with" in report.summary()
    layers = lora_layers(model)
    for name in ("emb", "attn"):
        assert torch.equal(layers[name].lora_A, kept_a[name])
    # (MultiheadAttention computes with out_proj's W + s·B·A, never calling it: the same)
    b_grads = {n: layers[n].lora_B.grad.clone() for n in report.initialised}
    model.zero_grad()
    nn.functional.mse_loss(model(tokens), target).backward()
    for name in report.initialised:
        assert not torch.equal(layers[name].lora_A, kept_a[name])
        torch.testing.assert_close(b_grads[name], layers[name].lora_B.grad, atol=1e-6, rtol=1e-5)


def test_randomized_svd_finds_the_same_top_directions(monkeypatch):
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(60, 60, generator=g)).Q
    v = torch.linalg.qr(torch.randn(90, 90, generator=g)).Q
    s = torch.cat([torch.tensor([50.0, 30.0, 20.0, 10.0]), torch.linspace(1.0, 0.1, 56)])
    m = (u[:, :60] * s) @ v[:, :60].T
    exact = top_right_singular_vectors(m, 4)
    monkeypatch.setattr(gi, "EXACT_SVD_MAX", 10)
    fast = top_right_singular_vectors(m, 4)
    assert torch.equal(fast, top_right_singular_vectors(m, 4))  # seeded: same each time
    torch.testing.assert_close((fast @ exact.T).abs(), torch.eye(4), atol=1e-4, rtol=0)
    # a rank above the matrix's side gives only as many directions as there are
    assert top_right_singular_vectors(m[:3], 8).shape == (3, 90)


def test_config_refuses_the_combinations_that_have_no_weight_gradient():
    with pytest.raises(ConfigError, match="use_dora=True") as err:
        LoRAConfig(init="gradient", use_dora=True)
    assert "init='kaiming'" in str(err.value)
    with pytest.raises(ConfigError, match="quantize_base='nf4'"):
        LoRAConfig(init="gradient", quantize_base="nf4")
    with pytest.raises(ConfigError, match="'gradient'"):
        LoRAConfig(init="svd")


def test_trained_adapters_and_non_finite_gradients_are_refused_before_any_change():
    torch.manual_seed(0)
    model = TinyNet(16)
    inject_lora(model, GRAD)
    for layer in lora_layers(model).values():
        layer.lora_B.data.fill_(0.1)
    with pytest.raises(ArgumentError, match="B is not zero") as err:
        GradientInit(model)
    assert "init='kaiming'" in str(err.value)

    model = TinyNet(16)
    inject_lora(model, GRAD)
    a_before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    init = GradientInit(model)
    init.start()
    x, y = _batch()
    nn.functional.cross_entropy(model(x), y).backward()
    model.fc2.weight.grad[0, 0] = float("inf")
    with pytest.raises(ArgumentError, match=r"non-finite at \['fc2'\]"):
        init.finish()
    now = adapter_state_dict(model)
    assert all(torch.equal(now[k], v) for k, v in a_before.items())
    init.cancel()
    assert not model.fc1.weight.requires_grad and model.fc1.weight.grad is None
    with pytest.raises(ArgumentError, match="call start"):
        init.finish()


# -- through LoRACallback -------------------------------------------------------------
class _Module(TinyTraining, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        net = TinyNet(16)
        self.fc1, self.fc2, self.head = net.fc1, net.fc2, net.head

    def train_dataloader(self):
        return sign_data()


class _FirstBatchGrads(L.Callback):
    """The adapted weights' gradients at the first ``on_before_optimizer_step``, read before
    the LoRA callback turns them into A (this callback is listed first)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = {n: m.weight.grad for n, m in lora_layers(pl_module).items()
                 if m.weight.grad is not None}
        if not self.grads and grads:
            self.grads = {n: g.clone() for n, g in grads.items()}


def _fit(tmp_path, steps: int, config: LoRAConfig = GRAD, module=None, ckpt=None, data=None,
         **kw):
    module = module or _Module()
    probe = _FirstBatchGrads()
    callback = LoRACallback(config, verbose=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[probe, callback], **kw)
    trainer.fit(module, data, ckpt_path=ckpt)
    return module, trainer, probe, callback


def test_callback_sets_a_from_the_first_steps_gradient_and_trains_on(tmp_path):
    module, trainer, probe, callback = _fit(tmp_path, 1)
    assert callback.first_step_init.done
    assert callback.first_step_init.report.initialised == ["fc1", "fc2"]
    # Plain SGD: A is untouched by the first step (its gradient is zero while B is).
    for name, layer in lora_layers(module).items():
        vh = torch.linalg.svd(probe.grads[name], full_matrices=False).Vh[:2]
        _same_rows_span(layer.lora_A.detach(), vh)
        assert not layer.lora_B.eq(0).all()  # the step used B's new gradient
        assert not layer.weight.requires_grad and layer.weight.grad is None
    assert trainer.callbacks[1].state_dict()["gradient_init_done"] is True

    # the same with a plain (kaiming) init gives another A
    plain, _, _, _ = _fit(tmp_path, 1, LoRAConfig(r=2, alpha=4, target_modules=["fc1", "fc2"]))
    assert not torch.equal(plain.fc1.lora_A, module.fc1.lora_A)


def test_accumulated_micro_batches_give_one_init_from_their_summed_gradient(tmp_path):
    module, _, probe, callback = _fit(tmp_path, 1, accumulate_grad_batches=2)
    x = torch.cat([b[0] for b, _ in zip(sign_data(), range(2), strict=False)])
    y = torch.cat([b[1] for b, _ in zip(sign_data(), range(2), strict=False)])
    fresh = _Module()  # the same seeded base; with B = 0 the weight gradient ignores A
    inject_lora(fresh, GRAD)
    want = _weight_grads(fresh, x, y)  # the mean over 16 = Lightning's sum of two halves
    for name in ("fc1", "fc2"):
        torch.testing.assert_close(probe.grads[name], want[name], atol=1e-6, rtol=1e-5)
    assert callback.first_step_init.report.initialised == ["fc1", "fc2"]


def test_a_resumed_run_keeps_its_a_and_equals_an_uninterrupted_one(tmp_path):
    # (whole epochs: a checkpoint saved mid-epoch restarts the epoch's batches)
    straight, _, _, _ = _fit(tmp_path / "a", -1, max_epochs=2)
    first, trainer, _, _ = _fit(tmp_path / "b", -1, max_epochs=1)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed, _, probe, callback = _fit(tmp_path / "c", -1, ckpt=str(ckpt), max_epochs=2)
    assert probe.grads == {}  # no weight gradient was ever computed: no init ran
    assert callback.first_step_init.done and callback.first_step_init.report is None
    for key, value in adapter_state_dict(straight).items():
        torch.testing.assert_close(adapter_state_dict(resumed)[key], value, atol=1e-6, rtol=1e-6)


def test_a_second_fit_on_a_trained_adapter_keeps_its_a(tmp_path):
    module, _, _, _ = _fit(tmp_path, 2)
    module, _, probe, callback = _fit(tmp_path, 1, module=module)
    assert callback.first_step_init.done and callback.first_step_init.report is None
    assert probe.grads == {}  # no weight gradient: A only took its own SGD step


def test_a_bfloat16_base_and_a_loss_scale_give_float32_adapters_from_the_same_directions():
    torch.manual_seed(0)
    model = TinyNet(16)
    inject_lora(model, GRAD)
    x, y = _batch()
    init = GradientInit(model)
    init.start()
    nn.functional.cross_entropy(model(x), y).backward()
    init.finish()
    want = {n: (m.lora_A.detach().clone(), m.lora_B.grad.clone())
            for n, m in lora_layers(model).items()}

    torch.manual_seed(0)
    scaled = TinyNet(16)
    inject_lora(scaled, GRAD)
    init = GradientInit(scaled)
    init.start()
    (nn.functional.cross_entropy(scaled(x), y) * 1024).backward()  # as a GradScaler does
    init.finish(grad_scale=1024)
    for name, layer in lora_layers(scaled).items():
        torch.testing.assert_close(layer.lora_A, want[name][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.lora_B.grad, want[name][1], atol=1e-6, rtol=1e-4)

    torch.manual_seed(0)
    half = TinyNet(16).to(torch.bfloat16)
    inject_lora(half, GRAD)
    init = GradientInit(half)
    init.start()
    nn.functional.cross_entropy(half(x.bfloat16()).float(), y).backward()
    init.finish()
    for name, layer in lora_layers(half).items():
        assert layer.lora_A.dtype == layer.lora_B.grad.dtype == torch.float32
        assert layer.weight.dtype == torch.bfloat16 and not layer.weight.requires_grad
        cos = (layer.lora_A / ROW_NORM) @ (want[name][0] / ROW_NORM).T
        assert cos.abs().diagonal().min() > 0.95  # bf16 rounding moves them only a little


class _Recorder(L.Callback):
    """Each step's B and head weight, after the step."""

    def __init__(self) -> None:
        self.b: list[torch.Tensor] = []
        self.head: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.b.append(pl_module.fc1.lora_B.detach().clone())
        self.head.append(pl_module.head.weight.detach().clone())


def test_init_after_steps_lets_the_rest_train_first_then_sets_a_from_that_steps_gradient(
        tmp_path):
    config = LoRAConfig(r=2, alpha=4, target_modules=["fc1", "fc2"], modules_to_save=["head"],
                        init="gradient")
    module, recorder, probe = _Module(), _Recorder(), _FirstBatchGrads()
    a_start = None

    class _A(L.Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal a_start
            a_start = pl_module.fc1.lora_A.detach().clone()

    callback = LoRACallback(config, verbose=False, init_after_steps=2)
    L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
              callbacks=[probe, callback, recorder, _A()]).fit(module)
    assert [bool(b.eq(0).all()) for b in recorder.b] == [True, True, False]  # waited 2 steps
    assert not torch.equal(recorder.head[0], recorder.head[1])  # the head trained meanwhile
    # A comes from the third step's weight gradient (the first one computed at all).
    vh = torch.linalg.svd(probe.grads["fc1"], full_matrices=False).Vh[:2]
    _same_rows_span(module.fc1.lora_A.detach(), vh)
    assert not torch.equal(module.fc1.lora_A, a_start)
    assert callback.first_step_init.report.initialised == ["fc1", "fc2"]


def test_init_after_steps_is_checked_when_the_callback_is_built():
    with pytest.raises(ArgumentError, match="init_after_steps: got -1; expected an integer"):
        LoRACallback(GRAD, init_after_steps=-1)
    with pytest.raises(ArgumentError, match="set init='gradient'"):
        LoRACallback(LoRAConfig(target_modules=["fc1"]), init_after_steps=3)


def test_layers_that_share_one_weight_are_frozen_again_after_the_init():
    torch.manual_seed(0)
    model = TinyNet(16)
    model.fc2 = nn.Linear(16, 16)
    model.fc3 = nn.Linear(16, 16)
    model.fc3.weight = model.fc2.weight  # tied
    inject_lora(model, LoRAConfig(r=2, target_modules=["fc2", "fc3"], init="gradient"))
    assert set(GradientInit(model).layers) == {"fc2", "fc3"}
    init = GradientInit(model)
    init.start()
    x, y = _batch()
    h = torch.relu(model.fc1(x))
    nn.functional.cross_entropy(model.head(model.fc3(torch.relu(model.fc2(h)))), y).backward()
    init.finish()
    assert not model.fc2.weight.requires_grad and not model.fc3.weight.requires_grad
    assert model.fc2.weight.grad is None


def test_a_sharded_strategy_is_refused_before_any_weight_is_touched():
    from types import SimpleNamespace

    from lora_lightning.lightning.gradient_start import FirstStepInit

    class FSDPStrategy:  # named as Lightning's: the check reads the class names
        pass

    class MyFSDP(FSDPStrategy):  # a subclass is sharded too
        pass

    module = _Module()
    inject_lora(module, GRAD)
    trainer = SimpleNamespace(strategy=MyFSDP(), global_step=0)
    with pytest.raises(ConfigError, match="strategy is MyFSDP, which shards") as err:
        FirstStepInit("default").batch_start(trainer, module)
    assert "strategy='ddp'" in str(err.value) and "init='kaiming'" in str(err.value)
    assert not any(m.weight.requires_grad for m in lora_layers(module).values())


def test_an_embedding_adapter_beside_does_not_count_as_trained(tmp_path):
    # FixtureModule: an embedding (whose LoRA B starts random) before fc1 (B starts at 0)
    config = LoRAConfig(r=2, target_modules=["emb", "fc1"], init="gradient")
    tokens = torch.randint(0, 10, (16, 4), generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(tokens, (tokens[:, 0] > 4).long()), batch_size=8)
    module, _, probe, callback = _fit(tmp_path, 1, config, module=FixtureModule(), data=data)
    assert callback.first_step_init.report.initialised == ["fc1"]
    assert "emb" in callback.first_step_init.report.kept
    assert set(probe.grads) == {"fc1"}
