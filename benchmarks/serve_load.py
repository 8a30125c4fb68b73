"""A bounded load test of the adapter server (``python -m lora_lightning.serve``): one
adapter for every request vs 16 adapters mixed round-robin, side by side.

The script writes a BERT-shaped classifier (random weights, ``--hidden``, ``--layers``) and
16 adapters (r=16 on query and value, each with its own head) to a temporary folder,
starts the server on 127.0.0.1, and sends a fixed number of requests from a fixed number
of concurrent clients, within a time limit, in interleaved rounds: single, mixed, single,
mixed, ... It reports each variant's throughput (requests per second) and p50/p99 latency
(medians over rounds) and the median of the paired mixed/single throughput ratios
(goal: at least 0.85).

    flock /tmp/heavy.lock .venv/bin/python benchmarks/serve_load.py            # ~1 min
    .venv/bin/python benchmarks/serve_load.py --smoke                           # seconds

``tests/test_serve.py`` imports :class:`Server` and :func:`load` from here and runs the
smoke version against its own server.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune, or to take arms against a sea of troubles",
    "My lord, the king your father. Who's there? Nay, answer me. Stand and unfold yourself.",
    "Hamlet says to Horatio that the user asks the assistant for a reply about the system",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, method: str, path: str, body: object = None, raw: bytes | None = None,
         timeout: float = 60) -> tuple[int, object]:
    """One HTTP request to the server; (status, the JSON body decoded, or its text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        text = resp.read().decode()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text
    finally:
        conn.close()


class Server:
    """``python -m lora_lightning.serve`` in a child process (its own process group), ready
    once ``/health`` answers 200; stopped with SIGINT (LitServe's graceful shutdown), then
    SIGKILL to the group if it lingers."""

    def __init__(self, model: Path, adapters: Path, *extra: str, startup: float = 90) -> None:
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="serve-", suffix=".log", delete=False)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lora_lightning.serve", "--model", str(model),
             "--adapters", str(adapters), "--port", str(self.port), *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=tempfile.gettempdir(),
            start_new_session=True)
        deadline = time.monotonic() + startup
        while True:
            if self.proc.poll() is not None:
                log = self.output()[-3000:]
                self.stop()
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{log}")
            try:
                if call(self.port, "GET", "/health", timeout=2)[0] == 200:
                    break
            except (OSError, http.client.HTTPException, ValueError):
                pass
            if time.monotonic() > deadline:
                log = self.output()[-3000:]
                self.stop()
                raise RuntimeError(f"the server did not answer /health within {startup} s:"
                                   f"\n{log}")
            time.sleep(0.2)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:  # the inference worker and LitServe's helpers share the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=15)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class LoadResult:
    sent: int
    ok: int
    seconds: float
    latencies: list[float]
    statuses: dict[int, int]

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds

    def percentile(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def load(port: int, adapters: Sequence[str | None], requests: int, concurrency: int,
         time_limit: float, texts: Sequence[str] = TEXTS) -> LoadResult:
    """``requests`` predictions from ``concurrency`` clients, request ``i`` naming
    ``adapters[i % len(adapters)]`` with ``texts[i % len(texts)]``; no request is sent
    after ``time_limit`` seconds."""
    lock = threading.Lock()
    state = {"next": 0}
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    start = time.monotonic()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                i = state["next"]
                if i >= requests or time.monotonic() - start > time_limit:
                    break
                state["next"] = i + 1
            body = json.dumps({"adapter": adapters[i % len(adapters)],
                               "text": texts[i % len(texts)]})
            t0 = time.monotonic()
            conn.request("POST", "/predict", body=body,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            dt = time.monotonic() - t0
            with lock:
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                if resp.status == 200:
                    latencies.append(dt)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - start
    return LoadResult(state["next"], statuses.get(200, 0), seconds, latencies, statuses)


def compare(port: int, names: Sequence[str], rounds: int, requests: int, concurrency: int,
            time_limit: float, texts: Sequence[str] = TEXTS) -> dict:
    """Interleaved rounds of one adapter vs all of ``names`` mixed, on the same ``texts``
    in the same order; medians per variant and the median of paired throughput ratios."""
    load(port, list(names), concurrency * 2, concurrency, time_limit, texts)  # warm-up
    runs: dict[str, list[LoadResult]] = {"single": [], "mixed": []}
    for _ in range(rounds):
        runs["single"].append(load(port, [names[0]], requests, concurrency, time_limit, texts))
        runs["mixed"].append(load(port, list(names), requests, concurrency, time_limit, texts))
    report = {}
    for variant, results in runs.items():
        report[variant] = {
            "requests_ok": sum(r.ok for r in results),
            "requests_sent": sum(r.sent for r in results),
            "statuses": {str(k): sum(r.statuses.get(k, 0) for r in results)
                         for k in sorted({k for r in results for k in r.statuses})},
            "throughput_rps": statistics.median(r.throughput for r in results),
            "p50_ms": 1000 * statistics.median(r.percentile(0.5) for r in results),
            "p99_ms": 1000 * statistics.median(r.percentile(0.99) for r in results),
        }
    report["mixed_over_single_throughput"] = statistics.median(
        m.throughput / s.throughput for s, m in zip(runs["single"], runs["mixed"], strict=True))
    return report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--requests", type=int, default=256, help="per round and variant")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--time-limit", type=float, default=60, help="seconds per round")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-timeout", type=float, default=0.01)
    p.add_argument("--smoke", action="store_true", help="tiny model, few requests (seconds)")
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.adapters = 32, 2, 4
        args.requests, args.concurrency, args.rounds, args.time_limit = 16, 4, 1, 20
    sys.path.insert(0, str(ROOT))
    from tests._serve_models import make_served

    names = [f"task{k}" for k in range(args.adapters)]
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = make_served(Path(tmp), "classify", names, hidden=args.hidden,
                               layers=args.layers, rank=args.rank)
        with Server(model, Path(tmp) / "adapters", "--max-batch-size",
                    str(args.max_batch_size), "--batch-timeout", str(args.batch_timeout)) as srv:
            report = compare(srv.port, names, args.rounds, args.requests, args.concurrency,
                             args.time_limit)
    report["settings"] = {k: v for k, v in vars(args).items()}
    report["settings"]["torch_threads"] = os.environ.get("OMP_NUM_THREADS", "default")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
