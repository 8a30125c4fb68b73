"""The adapter server on an app checkpoint (issue 22, item 4: ``--model <app checkpoint>``):
a tiny run of the Hydra app (a 2-layer BERT of hidden 32 as MiniLMClassifier's encoder,
three labels from a CSV) writes a checkpoint and its adapter; a second adapter is trained
onto that checkpoint (random values, as if trained) and saved. The server started on
127.0.0.1 with the checkpoint and both adapter directories answers each adapter, the
checkpoint's own and null, equal to the Python API (``second``, saved with label names
of its own, with those; the others with the run's): ``load_lora_checkpoint`` with the
network passed in (the README's way), ``load_adapter``, ``set_adapter``, one text at a
time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from lora_lightning import (
    LoRAConfig,
    inject_lora,
    load_adapter,
    load_lora_checkpoint,
    save_adapter,
    set_adapter,
)
from tests._helpers import randomize_adapters
from tests._tiny_lm import make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["bad", "good", "meh"]
SECOND = ["low", "mid", "high"]  # the second adapter's own label names
TEXTS = ["this film is good", "bad bad bad, number 7", "meh", "a long text " * 12]
MAX_LENGTH = 16


def _tiny_encoder(folder: Path) -> Path:
    from transformers import BertConfig, BertModel

    tok = make_tokenizer()
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def _net(encoder: Path, seed: int = 0):
    from lora_lightning.examples import MiniLMClassifier

    torch.manual_seed(seed)  # the server builds the untrained head from the run's seed
    return MiniLMClassifier(num_classes=3, model_path=encoder)


@pytest.fixture(scope="module")
def app_run(tmp_path_factory):
    """(checkpoint, encoder folder, adapters folder): a 3-step app run, its exported
    adapter as ``first`` and a second adapter added onto the checkpoint as ``second``."""
    from lora_lightning.examples import ClassifierModule

    root = tmp_path_factory.mktemp("serve_app")
    encoder = _tiny_encoder(root / "encoder")
    rows = ["text,label"] + [f"this film is {LABELS[i % 3]} number {i},{LABELS[i % 3]}"
                             for i in range(48)]
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [sys.executable, "-m", "lora_lightning.train", "data=text_files",
         "data.train=train.csv", f"+data.model_path={encoder}",
         f"+model.net.model_path={encoder}", f"data.max_length={MAX_LENGTH}",
         "data.batch_size=8", "trainer.max_steps=3", "trainer.enable_progress_bar=false",
         "lora.config.r=2", "logger=csv", "num_threads=1"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (ckpt,) = (root / "outputs").rglob("best.ckpt")
    adapters = root / "adapters"
    shutil.copytree(ckpt.parent.parent / "adapter", adapters / "first")
    module = load_lora_checkpoint(ClassifierModule, ckpt, net=_net(encoder))
    inject_lora(module, LoRAConfig(r=4, alpha=8, target_modules=["query", "value"],
                                   modules_to_save=["classifier"]), adapter="second")
    randomize_adapters(module, seed=3, std=0.5, adapter="second")
    save_adapter(module, adapters / "second", adapter="second", label_names=SECOND)
    return ckpt, encoder, adapters


class Reference:
    """The Python API: the checkpoint loaded with its network passed in, the adapter
    directories loaded beside its adapter, one adapter at a time."""

    def __init__(self, ckpt: Path, encoder: Path, adapters: Path) -> None:
        from transformers import AutoTokenizer

        from lora_lightning.examples import ClassifierModule

        self.tok = AutoTokenizer.from_pretrained(str(encoder))
        self.base = _net(encoder).eval()  # null: the untrained head, from the run's seed
        self.module = load_lora_checkpoint(ClassifierModule, ckpt, net=_net(encoder))
        for name in ("first", "second"):
            load_adapter(self.module, adapters / name, adapter=name)
        self.lock = threading.Lock()

    def probabilities(self, name: str | None, text: str) -> dict[str, float]:
        enc = self.tok(text, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        with self.lock, torch.no_grad():
            if name is None:
                logits = self.base(**inputs)
            else:
                set_adapter(self.module, name)
                logits = self.module(**inputs)
        names = SECOND if name == "second" else LABELS
        return dict(zip(names, logits.softmax(-1)[0].tolist(), strict=True))


def test_an_app_checkpoint_serves_each_adapter_as_the_python_api(app_run, sl):
    ckpt, encoder, adapters = app_run
    ref = Reference(ckpt, encoder, adapters)
    names = ["default", "first", "second", None]
    outs = {n: tuple(ref.probabilities(n, TEXTS[0]).values()) for n in names}
    # first is the run's own adapter (its trained head), so it equals default; the others
    # differ, so a wrong adapter cannot pass the checks below.
    assert outs["first"] == pytest.approx(outs["default"], abs=1e-6)
    assert list(ref.probabilities("second", TEXTS[0])) == SECOND
    assert len({outs["first"], outs["second"], outs[None]}) == 3
    with sl.Server(ckpt, adapters) as srv:
        assert sl.call(srv.port, "GET", "/adapters") == (
            200, {"adapters": ["default", "first", "second"], "task": "classify",
                  "labels": LABELS, "adapter_labels": {"default": LABELS, "first": LABELS,
                                                       "second": SECOND}})
        jobs = [(n, t) for t in TEXTS for n in names] * 2
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda job: sl.call(
                srv.port, "POST", "/predict", {"adapter": job[0], "text": job[1]}), jobs))
    for (name, text), (status, body) in zip(jobs, answers, strict=True):
        assert status == 200, body
        want = ref.probabilities(name, text)
        assert body["adapter"] == name
        assert body["probabilities"] == pytest.approx(want, abs=1e-5)
        assert body["label"] == max(want, key=want.get)


def test_a_checkpoint_without_its_run_config_is_refused(tmp_path):
    from lora_lightning.serve.engine import folder_task

    ckpt = tmp_path / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"not read")
    with pytest.raises(SystemExit, match=r"no app run config beside this checkpoint.*"
                                         r"\.hydra/config\.yaml"):
        folder_task(ckpt)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(
        "model:\n  _target_: lora_lightning.examples.CausalLMModule\n  model_path: null\n")
    with pytest.raises(SystemExit, match="not a classifier run"):
        folder_task(ckpt)
    (tmp_path / ".hydra" / "config.yaml").write_text(
        "model:\n  _target_: a.Module\n  net:\n    _target_: a.Net\n"
        "    model_path: ${oc.env:HOME}\n")
    with pytest.raises(SystemExit, match=r"model\.net\.model_path=.*interpolation"):
        folder_task(ckpt)
    (tmp_path / ".hydra" / "config.yaml").write_text(
        "model:\n  _target_: a.Module\n  net:\n    _target_: a.Net\n")
    assert folder_task(ckpt) == "classify"
