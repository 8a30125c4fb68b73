"""The adapter server tested like a server (issue 22, items 4 and 5): ``python -m
lora_lightning.serve`` starts on 127.0.0.1 with a tiny model and three adapters, real HTTP
requests are sent concurrently (so LitServe batches them into mixed batches), and each
answer equals what the Python API gives for that adapter alone. Adapters are hot-loaded
and deleted while requests are in flight; broken requests and refused files get their
status and one sentence; a small load test (benchmarks/serve_load.py) runs to the end. Adapter ``b`` and the
hot-loaded ``d`` were saved with label names of their own, which they answer with.
"""

from __future__ import annotations

import json
import pickle
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from lora_lightning import load_adapter, set_adapter
from tests._serve_models import make_adapters, make_served

LABELS = {"b": ["sad", "flat", "glad"], "d": ["no", "maybe", "yes"]}
TEXTS = ["To be, or not to be", "My lord, the king your father.", "Whether",
         "The slings and arrows of outrageous fortune, or to take arms"]


class Payload:
    """Unpickling this calls ``open(path, "w")``: it creates ``path``."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def cls(tmp_path_factory, sl):
    """A classifier server with adapters a, b, c; d lies outside its folder; a corrupt and
    an unsafe adapter beside it. Yields (port, folder, reference)."""
    root = tmp_path_factory.mktemp("serve_cls")
    model, _ = make_served(root, "classify", ["a", "b", "c"], labels=LABELS)
    make_adapters(model, root / "extra", ["d"], "classify", seed=7, labels=LABELS)
    two = shutil.copytree(root / "extra" / "d", root / "two_labels")
    meta = json.loads((two / "lora_lightning.json").read_text())
    meta["label_names"] = ["no", "yes"]
    (two / "lora_lightning.json").write_text(json.dumps(meta))
    corrupt = shutil.copytree(root / "extra" / "d", root / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00not a safetensors file" * 9)
    unsafe = shutil.copytree(root / "extra" / "d", root / "unsafe")
    (unsafe / "adapter_model.safetensors").unlink()
    (unsafe / "adapter_model.bin").write_bytes(pickle.dumps(Payload(root / "pwned")))
    with sl.Server(model, root / "adapters") as srv:
        yield srv.port, root, Reference(model, {n: root / "adapters" / n for n in "abc"}
                                        | {"d": root / "extra" / "d"})


class Reference:
    """What the Python API gives: each adapter alone (``set_adapter``), the base model for
    None, one text at a time, no padding; the label names each adapter was saved with,
    else the model's."""

    def __init__(self, folder: Path, dirs: dict[str, Path]) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(folder))
        self.base = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
        self.model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
        for name, path in dirs.items():
            load_adapter(self.model, path, adapter=name)
        self.labels = [self.model.config.id2label[i] for i in range(3)]
        self.lock = threading.Lock()

    def labels_of(self, name: str | None) -> list[str]:
        return LABELS.get(name, self.labels) if name else self.labels

    def probabilities(self, name: str | None, text: str) -> dict[str, float]:
        with self.lock, torch.no_grad():
            enc = self.tok(text, return_tensors="pt")
            if name is None:
                logits = self.base(**enc).logits
            else:
                set_adapter(self.model, name)
                logits = self.model(**enc).logits
        return dict(zip(self.labels_of(name), logits.softmax(-1)[0].tolist(), strict=True))


def _check(answer, ref: Reference, name, text) -> None:
    status, body = answer
    assert status == 200, body
    want = ref.probabilities(name, text)
    assert body["adapter"] == name
    assert body["probabilities"] == pytest.approx(want, abs=1e-5)
    assert body["label"] == max(want, key=want.get)


def _predict(sl, port, name, text):
    return sl.call(port, "POST", "/predict", {"adapter": name, "text": text})


def test_concurrent_mixed_requests_equal_each_adapter_alone(cls, sl):
    port, _, ref = cls
    jobs = [(n, t) for t in TEXTS for n in ["a", "b", "c", None]] * 2
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda job: _predict(sl, port, *job), jobs))
    for (name, text), answer in zip(jobs, answers, strict=True):
        _check(answer, ref, name, text)
    # The adapters differ from each other and from the base, so the checks above could
    # not pass with the wrong adapter applied.
    outs = {tuple(ref.probabilities(n, TEXTS[0]).values()) for n in ["a", "b", "c", None]}
    assert len(outs) == 4
    assert sl.call(port, "GET", "/adapters") == (
        200, {"adapters": ["a", "b", "c"], "task": "classify", "labels": ref.labels,
              "adapter_labels": {"a": ref.labels, "b": LABELS["b"], "c": ref.labels}})


def test_hot_load_and_delete_while_requests_are_in_flight(cls, sl):
    port, root, ref = cls
    jobs = [(n, t) for t in TEXTS for n in ["a", "b", None]] * 4
    with ThreadPoolExecutor(6) as pool:
        pending = [pool.submit(_predict, sl, port, *job) for job in jobs]
        loaded = sl.call(port, "POST", "/adapters", {"name": "d", "path": str(root / "extra" / "d")})
        deleted = sl.call(port, "DELETE", "/adapters/c")
        answers = [p.result() for p in pending]
    assert loaded == (200, {"loaded": "d", "adapters": ["a", "b", "c", "d"]})
    assert deleted == (200, {"deleted": "c", "adapters": ["a", "b", "d"]})
    for (name, text), answer in zip(jobs, answers, strict=True):
        _check(answer, ref, name, text)
    _check(_predict(sl, port, "d", TEXTS[1]), ref, "d", TEXTS[1])
    assert sl.call(port, "GET", "/adapters")[1]["adapter_labels"] == {
        "a": ref.labels, "b": LABELS["b"], "d": LABELS["d"]}
    status, body = _predict(sl, port, "c", TEXTS[1])
    assert status == 404 and "'c'" in body["error"] and "['a', 'b', 'd']" in body["error"]
    # Put the server back as it was (a relative path is taken inside --adapters).
    assert sl.call(port, "DELETE", "/adapters/d")[0] == 200
    assert sl.call(port, "POST", "/adapters", {"name": "c", "path": "c"})[0] == 200
    _check(_predict(sl, port, "c", TEXTS[2]), ref, "c", TEXTS[2])


@pytest.mark.parametrize(("raw", "needle"), [
    (b'{"adapter": "a",', "not valid JSON"),
    (b'["a", "text"]', "must be a JSON object"),
    (b'{"adapter": "a"}', "'text' is missing"),
    (b'{"text": "hello"}', "'adapter' is missing"),
    (b'{"adapter": "a", "text": 7}', "'text' must be a non-empty string"),
    (b'{"adapter": 3, "text": "hi"}', "'adapter' must be an adapter name or null"),
])
def test_bad_requests_are_400_with_one_sentence(cls, sl, raw, needle):
    port, _, _ = cls
    status, body = sl.call(port, "POST", "/predict", raw=raw)
    assert status == 400 and needle in body["error"]
    assert body["error"].count(". ") == 0 and "\n" not in body["error"]


def test_unknown_names_are_404_naming_those_that_exist(cls, sl):
    port, _, _ = cls
    status, body = _predict(sl, port, "nope", "hi")
    assert status == 404 and "'nope'" in body["error"] and "['a', 'b', 'c']" in body["error"]
    status, body = sl.call(port, "DELETE", "/adapters/nope")
    assert status == 404 and "['a', 'b', 'c']" in body["error"]


def test_refused_hot_loads_leave_the_server_serving(cls, sl):
    port, root, ref = cls
    assert sl.call(port, "POST", "/adapters", {"name": "x"})[0] == 400
    status, body = sl.call(port, "POST", "/adapters", {"name": "a", "path": "b"})
    assert status == 409 and "already holds adapter 'a'" in body["error"]
    status, body = sl.call(port, "POST", "/adapters", {"name": "x", "path": "no_such"})
    assert status == 404 and "not an adapter directory" in body["error"]
    status, body = sl.call(port, "POST", "/adapters", {"name": "bad-name", "path": "a"})
    assert status == 400
    status, body = sl.call(port, "POST", "/adapters",
                           {"name": "x", "path": str(root / "corrupt")})
    assert status == 422 and "unreadable safetensors" in body["error"]
    status, body = sl.call(port, "POST", "/adapters",
                           {"name": "x", "path": str(root / "unsafe")})
    assert status == 422 and "can run code when loaded" in body["error"]
    assert not (root / "pwned").exists()  # the pickle never ran
    status, body = sl.call(port, "POST", "/adapters",
                           {"name": "x", "path": str(root / "two_labels")})
    assert status == 422 and "names 2 labels ['no', 'yes']" in body["error"]
    assert "head has 3 outputs" in body["error"]
    assert "two_labels/lora_lightning.json" in body["error"]  # the file the labels are in
    assert sl.call(port, "GET", "/adapters")[1]["adapters"] == ["a", "b", "c"]
    _check(_predict(sl, port, "a", TEXTS[3]), ref, "a", TEXTS[3])


def test_load_test_smoke(cls, sl):
    """benchmarks/serve_load.py's comparison, small: every request answered, figures
    reported (no timing assertion: CI machines are shared)."""
    port, _, _ = cls
    report = sl.compare(port, ["a", "b", "c"], rounds=1, requests=12, concurrency=4,
                        time_limit=30)
    for variant in ("single", "mixed"):
        r = report[variant]
        assert r["requests_ok"] == r["requests_sent"] == 12 and r["statuses"] == {"200": 12}
        assert r["throughput_rps"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
    assert report["mixed_over_single_throughput"] > 0


def test_causal_lm_server_generates_what_each_adapter_generates_alone(tmp_path, sl):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, dirs = make_served(tmp_path, "generate", ["a", "b", "c"])
    ref = AutoModelForCausalLM.from_pretrained(str(model)).eval()
    tok = AutoTokenizer.from_pretrained(str(model))
    for name, path in dirs.items():
        load_adapter(ref, path, adapter=name)
    pairs = [(n, t) for t in TEXTS[:3] for n in ["a", "b", "c"]]
    jobs = [(n, t, k) for k, (n, t) in enumerate(pairs, start=1)]
    with sl.Server(model, tmp_path / "adapters", "--max-new-tokens", "9") as srv:
        with ThreadPoolExecutor(9) as pool:
            answers = list(pool.map(lambda j: sl.call(srv.port, "POST", "/predict", {
                "adapter": j[0], "text": j[1], "max_new_tokens": j[2]}), jobs))
        too_many = sl.call(srv.port, "POST", "/predict",
                           {"adapter": "a", "text": "hi", "max_new_tokens": 10})
    outputs = set()
    for (name, text, k), (status, body) in zip(jobs, answers, strict=True):
        assert status == 200, body
        enc = tok(text, return_tensors="pt")
        set_adapter(ref, name)
        with torch.no_grad():
            out = ref.generate(**enc, max_new_tokens=k, do_sample=False,
                               pad_token_id=tok.pad_token_id)
        want = out[0, enc["input_ids"].shape[1]:].tolist()
        assert body["token_ids"] == want
        assert body["text"] == tok.decode(want, skip_special_tokens=True)
        outputs.add((text, tuple(want[:3])))
    assert len(outputs) > 3  # the adapters generate differently from one prompt
    assert too_many[0] == 400 and "from 1 to 9" in too_many[1]["error"]


def test_model_task_refuses_other_architectures():
    from transformers import BertConfig

    from lora_lightning.serve.engine import model_task

    assert model_task(BertConfig(architectures=["BertForSequenceClassification"])) == "classify"
    with pytest.raises(SystemExit, match=r"\['BertModel'\].*ForSequenceClassification"):
        model_task(BertConfig(architectures=["BertModel"]))


def test_readme_server_example_runs_as_printed(tmp_path, sl, monkeypatch):
    """README's "Serving many adapters over HTTP": its Python block, its server command
    and each curl line, as printed (only the port differs: a free one)."""
    import json
    import re
    import subprocess

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("### Serving many adapters over HTTP"):]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    shell = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1).splitlines()
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (serving)", "exec"), {})
    assert shell[0] == (".venv/bin/python -m lora_lightning.serve --model served/model "
                        "--adapters served/adapters --port 8000 &")
    with sl.Server(tmp_path / "served" / "model", tmp_path / "served" / "adapters") as srv:
        answers = []
        for line in shell[1:]:
            assert "127.0.0.1:8000" in line
            run = subprocess.run(line.replace("127.0.0.1:8000", f"127.0.0.1:{srv.port}"),
                                 shell=True, cwd=tmp_path, capture_output=True, text=True,
                                 timeout=60)
            assert run.returncode == 0, (line, run.stderr)
            answers.append(json.loads(run.stdout))
    assert [a.get("error") for a in answers] == [None] * 6, answers
    assert answers[0]["adapters"] == ["party", "sentiment"]
    assert answers[0]["adapter_labels"]["party"] == ["democrat", "republican"]
    assert answers[1]["adapter"] == "sentiment" and set(answers[1]["probabilities"]) == {
        "negative", "positive"}
    assert answers[2]["adapter"] == "party" and set(answers[2]["probabilities"]) == {
        "democrat", "republican"}
    assert answers[3]["adapter"] is None
    assert answers[4] == {"deleted": "party", "adapters": ["sentiment"]}
    assert answers[5] == {"loaded": "party", "adapters": ["sentiment", "party"]}


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc/<pid>/stat's ppid field)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.name.isdigit() and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_to_the_server_stops_all_its_processes_and_frees_the_port(tmp_path, sl, sig):
    """``kill <pid>`` (SIGTERM) or Ctrl-C (SIGINT) sent to the server's process only (it is
    started as the README starts it, in the caller's process group): within seconds no
    process it started is left running and the port can be bound again."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    model, _ = make_served(tmp_path, "classify", ["a"])
    port = sl.free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(sl.ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lora_lightning.serve", "--model", str(model),
             "--adapters", str(tmp_path / "adapters"), "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if sl.call(port, "GET", "/adapters", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not answer GET /adapters"
            time.sleep(0.2)
        children = _children(proc.pid)
        assert len(children) >= 2  # LitServe's HTTP worker and inference worker at least
        proc.send_signal(getattr(signal, sig))
        deadline = time.monotonic() + 10
        while (proc.poll() is None or any(map(_running, children))) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is not None, f"the server is still running 10 s after {sig}"
        assert [pid for pid in children if _running(pid)] == [], (
            f"processes the server started outlive it after {sig}")
        with socket.socket() as s:  # as uvicorn binds; fails while anything listens
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
    finally:
        for pid in [proc.pid, *children]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=15)
