"""Serve what ``run.py`` left in ``outputs/multi_adapter/`` and check it over HTTP.

1. Starts ``python -m lora_lightning.serve --model <out>/checkpoints/sentiment.ckpt
   --adapters <out>/adapters`` on 127.0.0.1 (the sentiment adapter is the checkpoint's own,
   party comes from its directory).
2. Sends ``--samples`` test texts per task, concurrently (so LitServe batches them, mixed):
   each sentiment text to ``sentiment``, each party passage to ``party``, and each of both
   to ``null`` (the base model with its untrained head). Every answer must equal the Python
   API's output for that adapter, one text at a time (``load_lora_checkpoint`` with the
   network passed in, ``load_adapter``, ``set_adapter``; for null, the network built from
   the run's seed): probabilities within ``--tolerance``, the same label, and the label
   names of that adapter (rotten/fresh, democrat/republican).
3. Load test with benchmarks/serve_load.py's client (``compare``): interleaved rounds of
   every request naming ``sentiment`` vs requests alternating sentiment and party, on the
   same texts (sentiment snippets and party passages alternating), throughput and p50/p99
   latency, with ``--concurrency`` clients and then with one client (a quarter of the
   requests: the latency of a request that waits for no other).

Writes ``serve_results.json`` beside this file.

    flock /tmp/heavy.lock .venv/bin/python experiments/multi_adapter/serve_check.py
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "benchmarks"))  # as the benchmarks import each other
import run  # noqa: E402  (this experiment's data and settings)
import serve_load  # noqa: E402  (its Server, call and compare)


class Reference:
    """The Python API, one text at a time."""

    def __init__(self, ckpt: Path, adapters: Path) -> None:
        from lora_lightning import load_adapter, load_lora_checkpoint
        from lora_lightning.examples import ClassifierModule, MiniLMClassifier

        def net():
            torch.manual_seed(run.SEED)  # as run.py and the server build it
            return MiniLMClassifier(num_classes=2, dropout=0.1)

        self.tokenizer = run.load_minilm_tokenizer()
        self.base = net().eval()
        self.module = load_lora_checkpoint(ClassifierModule, ckpt, net=net())
        load_adapter(self.module, adapters / "party", adapter="party")
        self.lock = threading.Lock()

    @torch.no_grad()
    def probabilities(self, adapter: str | None, text: str) -> list[float]:
        from lora_lightning import set_adapter

        enc = self.tokenizer(text, truncation=True, max_length=run.MAX_LEN, return_tensors="pt")
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        with self.lock:
            if adapter is None:
                return self.base(**inputs).softmax(-1)[0].tolist()
            set_adapter(self.module, adapter)
            return self.module(**inputs).softmax(-1)[0].tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--served", type=Path, default=run.SERVED, help="run.py's --out")
    p.add_argument("--samples", type=int, default=100, help="test texts per task")
    p.add_argument("--tolerance", type=float, default=1e-5)
    p.add_argument("--requests", type=int, default=256, help="per round and variant")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--time-limit", type=float, default=120, help="seconds per round")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    sl = serve_load
    served = args.served.resolve()
    ckpt, adapters = served / "checkpoints" / "sentiment.ckpt", served / "adapters"
    _, _, rt_test = run.split_by_movie(run.load_rotten_tomatoes(), 1500, 0, 1000, seed=run.SEED)
    tests = {"sentiment": [(s.text, s.label) for s in rt_test][:args.samples],
             "party": run.political_passages(1500, 1000)[1][:args.samples]}
    jobs = [(task, adapter, text, y) for task, pairs in tests.items() for text, y in pairs
            for adapter in (task, None)]
    ref = Reference(ckpt, adapters)
    report: dict[str, object] = {"command": " ".join(sys.argv), "samples_per_task": args.samples}
    start = time.perf_counter()
    with sl.Server(ckpt, adapters, startup=600) as srv:
        report["server_start_s"] = round(time.perf_counter() - start, 1)
        status, listed = sl.call(srv.port, "GET", "/adapters")
        assert status == 200, listed
        report["adapters"] = listed
        with ThreadPoolExecutor(args.concurrency) as pool:
            answers = list(pool.map(lambda j: sl.call(
                srv.port, "POST", "/predict", {"adapter": j[1], "text": j[2]}), jobs))
        texts = [t for pair in zip(tests["sentiment"], tests["party"], strict=True)
                 for t, _ in pair]
        report["load_test"] = sl.compare(
            srv.port, ["sentiment", "party"], args.rounds, args.requests, args.concurrency,
            args.time_limit, texts)
        report["one_client"] = sl.compare(  # latency without queueing: one request at a time
            srv.port, ["sentiment", "party"], args.rounds, args.requests // 4, 1,
            args.time_limit, texts)
    worst, right = 0.0, {}
    for (task, adapter, text, y), (status, body) in zip(jobs, answers, strict=True):
        assert status == 200, (adapter, text, body)
        names = run.LABELS[adapter or "sentiment"]  # null: the model's (the checkpoint's)
        assert body["adapter"] == adapter and list(body["probabilities"]) == names, body
        want = ref.probabilities(adapter, text)
        got = list(body["probabilities"].values())
        worst = max(worst, *(abs(a - b) for a, b in zip(got, want, strict=True)))
        assert body["label"] == names[max(range(2), key=want.__getitem__)], (body, want)
        if adapter is not None:
            right[task] = right.get(task, 0) + (body["label"] == run.LABELS[task][y])
    assert worst <= args.tolerance, f"largest difference {worst} > {args.tolerance}"
    report["answers_checked"] = len(jobs)
    report["max_abs_prob_diff_vs_python_api"] = worst
    report["served_accuracy_on_the_sample"] = {k: v / args.samples for k, v in right.items()}
    (HERE / "serve_results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
