"""Bad input never gets far: any config mapping either fails at once with a ValueError or
TypeError naming the field, or it injects into a real model and trains.

``test_config.py`` fuzzes ``LoRAConfig(**fields)`` itself; here the fuzzing goes through the
user-facing doors: ``LoRACallback({...})`` (unknown keys, wrong containers, bad ``save``), a
real injection and optimizer step for every config that builds, a few full Lightning fits,
and the Hydra app's ``lora.config.*`` command-line overrides (composed in-process, plus two
real subprocess runs of the app).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import fields

import pytest
import torch
from _reliability_worker import loader, make_trainer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lora_lightning import LoRACallback, LoRAConfig, inject_lora

FIELDS = [f.name for f in fields(LoRAConfig)]
# Names of modules in ``Toy`` (and near misses), for targets that sometimes match.
NAMES = ["a", "b", "q", "blk", "blk.q", "blk.emb", "head", "conv", "zz", "all-linear"]


class Toy(nn.Module):
    """Linear, Embedding, Conv1d and a container, so every target kind can match."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.blk = nn.ModuleDict({"q": nn.Linear(8, 8), "emb": nn.Embedding(10, 8)})
        self.conv = nn.Conv1d(1, 1, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = self.blk["q"](torch.relu(self.b(torch.relu(self.a(x))))) + self.blk["emb"](ids)
        h = self.conv(h.unsqueeze(1)).squeeze(1)
        return self.head(h)


_numbers = st.one_of(st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from([0, 1, 2, 8, 0.5, 1e-300, 10**400]))
_regex = st.one_of(st.sampled_from(["a|b", r"blk\.q", ".*", "(", "[a-", "a{2,1}", "(?i)a", "*",
                                    "", "head", r"(?:b|blk\.\w+)"]),
                   st.text(alphabet="ab.q*+?()[]|\\", max_size=6))
_names_list = st.lists(st.one_of(st.sampled_from(NAMES), st.text(max_size=3), st.integers(),
                                 st.none()), max_size=3)
_value = st.one_of(
    st.none(), st.booleans(), _numbers, _regex, _names_list, st.tuples(st.sampled_from(NAMES)),
    st.sampled_from(["none", "all", "lora_only", "kaiming", "gaussian", "true", "8"]),
    st.dictionaries(_regex, _numbers, max_size=2), st.binary(max_size=2),
)
_list_of_names = st.lists(st.sampled_from(NAMES[:-1]), min_size=1, max_size=3)
# Values a user could mean, per field; each field gets these half the time and junk otherwise.
PLAUSIBLE = {
    "r": st.integers(1, 8),
    "alpha": st.one_of(st.integers(1, 32), st.floats(0.1, 64)),
    "dropout": st.floats(0, 0.9),
    "target_modules": st.one_of(_list_of_names, st.sampled_from(
        ["all-linear", "a|b", r"blk\.q", r"blk\.\w+", "conv|head", ".*"])),
    "exclude_modules": st.one_of(st.none(), _list_of_names),
    "rank_pattern": st.dictionaries(st.sampled_from(NAMES[:-1]), st.integers(1, 6), max_size=2),
    "alpha_pattern": st.dictionaries(st.sampled_from(NAMES[:-1]), st.floats(0.5, 32),
                                     max_size=2),
    "use_rslora": st.booleans(),
    "use_dora": st.booleans(),
    "init": st.sampled_from(["kaiming", "gaussian"]),
    "bias": st.sampled_from(["none", "all", "lora_only"]),
    "modules_to_save": st.sampled_from([None, ["head"], ["b"], "head"]),
}
UNKNOWN = ["rank", "lora_alpha", "targets", ""]


@st.composite
def mappings(draw):
    """target_modules plus up to 4 other fields, sometimes an unknown key."""
    others = [f for f in FIELDS if f != "target_modules"]
    keys = ["target_modules"] + draw(st.lists(st.sampled_from(others), unique=True, max_size=4))
    if draw(st.integers(0, 9)) == 0:
        keys.append(draw(st.sampled_from(UNKNOWN)))
    out = {}
    for k in dict.fromkeys(keys):
        junk = draw(st.integers(0, 3 if k == "target_modules" else 1)) == 0
        out[k] = draw(_value if junk or k not in PLAUSIBLE else PLAUSIBLE[k], label=k)
    return out


def check_refusal(mapping: dict, err: Exception) -> None:
    """The error names what is wrong: the unknown keys, or an invalid field."""
    message = str(err)
    unknown = sorted(set(mapping) - set(FIELDS))
    if unknown:
        assert f"unknown field(s) {unknown}" in message, message
        assert "valid fields are" in message
        return
    named = [k for k in mapping if f"LoRAConfig.{k}:" in message]
    assert named, message


def train_one_step(model: Toy) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    opt = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x, ids = torch.randn(4, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
    loss = nn.functional.cross_entropy(model(x, ids), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    opt.step()
    assert math.isfinite(loss.item())
    assert all(torch.isfinite(p).all() for p in params)
    return loss.item()


INJECTION_REFUSALS = ("matches no module", "which LoRA does not support",
                      "which DoRA does not support")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mapping=mappings())
def test_any_callback_config_mapping_fails_clearly_or_trains(mapping):
    try:
        callback = LoRACallback(mapping, verbose=False)
    except (ValueError, TypeError) as err:
        check_refusal(mapping, err)
        return
    model = Toy()
    try:
        inject_lora(model, callback.config)
    except (ValueError, TypeError) as err:
        assert any(s in str(err) for s in INJECTION_REFUSALS), str(err)
        assert "LoRAConfig." in str(err) or "target module" in str(err), str(err)
        return
    train_one_step(model)


@pytest.mark.parametrize("config", [None, 8, "r=8", ["r", 8], LoRAConfig, object()])
def test_callback_config_of_wrong_type_names_the_argument(config):
    with pytest.raises(TypeError, match=r"LoRAConfig|LoRACallback\.config"):
        LoRACallback(config)


@pytest.mark.parametrize("save", ["adapters", "", None, 1, "FULL"])
def test_callback_save_mode_names_the_argument_and_the_choices(save):
    with pytest.raises(ValueError, match=r"LoRACallback\.save: .*\['adapter', 'full'\]"):
        LoRACallback({"r": 2}, save=save)


# -- a few of them through a real Trainer --------------------------------------------------
class ToyModule:
    """Built lazily so that hypothesis' health check does not time the Lightning import."""

    @staticmethod
    def make():
        import lightning as L

        class M(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = Toy()

            def training_step(self, batch, batch_idx):
                x, y = batch
                ids = (x[:, 0].abs() * 3).long().clamp(max=9)
                return nn.functional.cross_entropy(self.net(x, ids), y)

            def configure_optimizers(self):
                return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad])

        return M()


_valid = st.fixed_dictionaries(
    {"target_modules": st.sampled_from([["a"], ["q", "b"], "all-linear", r".*blk\.(q|emb)",
                                        ["conv"], ["emb"]])},
    optional={"r": st.integers(1, 6), "alpha": st.floats(0.5, 64), "dropout": st.floats(0, 0.9),
              "use_dora": st.booleans(), "use_rslora": st.booleans(),
              "bias": st.sampled_from(["none", "all", "lora_only"]),
              "init": st.sampled_from(["kaiming", "gaussian"]),
              "modules_to_save": st.sampled_from([None, ["head"]]),
              "rank_pattern": st.sampled_from([{}, {"a": 3}, {r"blk\.q": 2}])},
)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(mapping=_valid)
def test_valid_mappings_train_a_step_in_a_real_trainer(tmp_path, mapping):
    module = ToyModule.make()
    trainer = make_trainer(tmp_path, LoRACallback(mapping, verbose=False), max_steps=1,
                           enable_checkpointing=False)
    try:
        trainer.fit(module, loader(1))
    except TypeError as err:  # DoRA on an Embedding: refused before anything is changed
        assert "which DoRA does not support" in str(err)
        return
    assert trainer.global_step == 1


# -- the Hydra app's lora.config overrides ---------------------------------------------------
def _hydra_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    return repr(value)


_override_values = st.one_of(st.none(), st.booleans(), st.integers(-2, 20),
                             st.floats(-1, 100, allow_nan=False), _regex,
                             st.lists(st.sampled_from(["query", "value", "key", "dense", ""]),
                                      max_size=2))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS + ["rank", "targets"]), value=_override_values)
def test_hydra_lora_overrides_fail_with_the_config_key_or_build(tmp_path, field, value):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    import lora_lightning.train as app

    conf = os.path.join(os.path.dirname(app.__file__), "conf")
    override = f"++lora.config.{field}={_hydra_value(value)}"  # set or add
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("train", overrides=["lora=qv", override], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
    try:
        callback = app._build(cfg.lora.callback, "lora.callback")
    except app.AppError as err:
        message = str(err)
        assert f"lora.config.{field}" in message or f"'{field}'" in message, message
        assert "Traceback" not in message and "LoRAConfig." not in message, message
        return
    assert isinstance(callback, LoRACallback)


APP_CASES = [
    ("lora.config.r=0", "lora.config.r: got 0; expected an integer >= 1"),
    ("+lora.config.rank=8", "unknown field(s) ['rank']"),
]


def test_the_app_exits_with_one_paragraph_naming_the_key(tmp_path):
    """The real command line, in subprocesses (run side by side): status 1, the message
    naming the key, no traceback."""
    env = {**os.environ, "HYDRA_FULL_ERROR": ""}
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "lora_lightning.train", "lora=qv", override,
             f"hydra.run.dir={tmp_path / str(i)}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for i, (override, _) in enumerate(APP_CASES)
    ]
    for run, (override, named) in zip(runs, APP_CASES, strict=True):
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 1, (override, stderr)
        assert named in stderr, (override, stderr)
        assert "Traceback" not in stderr, (override, stderr)
