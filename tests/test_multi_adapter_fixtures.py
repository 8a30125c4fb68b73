"""Files written before named adapters existed still load (issue 10). The fixtures in
tests/fixtures/single_adapter_v1 were made by commit 64f9942 with
tests/fixtures/make_single_adapter_v1.py: an adapter directory and an adapter-only
checkpoint of a model with an embedding, a Linear and a modules_to_save head. The expected
outputs were computed on that machine, so they hold up to float32 rounding here."""

from pathlib import Path

import pytest
import torch
from _fixture_module import FixtureModule
from _helpers import assert_close_fp32

from lora_lightning import (
    LoRAConfig,
    inject_lora,
    list_adapters,
    load_adapter,
    load_lora_checkpoint,
    read_checkpoint,
    set_adapter,
)

pytestmark = pytest.mark.usefixtures("one_thread")
FIXTURES = Path(__file__).parent / "fixtures" / "single_adapter_v1"


def expected():
    data = torch.load(FIXTURES / "expected.pt", weights_only=True)
    return data["x"], data["y"]


def test_an_old_adapter_directory_loads_with_its_outputs():
    x, y = expected()
    model = load_adapter(FixtureModule(), FIXTURES / "adapter").eval()
    assert list_adapters(model) == ["default"]
    with torch.no_grad():
        assert_close_fp32(model(x), y)


def test_an_old_adapter_only_checkpoint_loads_with_its_outputs():
    x, y = expected()
    assert "adapter" not in read_checkpoint(FIXTURES / "adapter_only.ckpt")["lora_lightning"]
    model = load_lora_checkpoint(FixtureModule, FIXTURES / "adapter_only.ckpt")
    with torch.no_grad():
        assert_close_fp32(model(x), y)


def test_an_old_adapter_loads_as_a_named_adapter_beside_another():
    x, y = expected()
    model = FixtureModule()
    inject_lora(model, LoRAConfig(r=3, target_modules=["fc1"], modules_to_save=["head"]),
                adapter="other")
    load_adapter(model, FIXTURES / "adapter", adapter="old")
    set_adapter(model, "old")
    with torch.no_grad():
        assert_close_fp32(model.eval()(x), y)
