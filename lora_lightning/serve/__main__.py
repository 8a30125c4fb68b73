"""``python -m lora_lightning.serve --model <folder or app checkpoint> --adapters <folder>
--port 8000``.

SIGTERM (``kill <pid>``) stops the server as Ctrl-C does: LitServe's ``run`` shuts its
HTTP worker, inference worker and queue manager down on ``KeyboardInterrupt``, so the
server's own process turns SIGTERM into one. Without that, SIGTERM killed only this process
and left its workers running, still listening on the port.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m lora_lightning.serve",
        description="Serve a transformers model with many LoRA adapters over HTTP: each "
                    "request names its adapter, concurrent requests run as one batch.")
    p.add_argument("--model", required=True,
                   help="a transformers folder (save_pretrained) of a *ForSequenceClassification "
                        "or *ForCausalLM model, with its tokenizer; or a classifier checkpoint "
                        "of the lora-lightning app (<run>/checkpoints/best.ckpt, built from "
                        "<run>/.hydra/config.yaml; its adapter is served too)")
    p.add_argument("--adapters", default=None,
                   help="a folder whose subfolders are adapter directories (save_adapter, PEFT, "
                        "or an app run's adapter/); each is served under its subfolder's name")
    p.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "0.0.0.0", "::"],
                   help="127.0.0.1 (default) keeps the server, whose /adapters routes load "
                        "files from this machine, local")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=16,
                   help="LitServe's dynamic batching: most requests in one batch")
    p.add_argument("--batch-timeout", type=float, default=0.01,
                   help="seconds a batch waits to fill up")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="causal LM: default and largest max_new_tokens a request may ask")
    p.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--log-level", default="warning")
    return p.parse_args(argv)


def _interrupt_on_sigterm() -> None:
    """SIGTERM raises ``KeyboardInterrupt`` in this process. The processes LitServe forks
    inherit the handler; in them SIGTERM keeps its default action, which LitServe's shutdown
    (``terminate()``) and uvicorn's (it raises the signal again once done) rely on."""
    pid = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != pid:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _end_children(grace: float = 5) -> None:
    """Terminate (then kill, after ``grace`` seconds) the processes LitServe started that are
    still alive: a signal during start-up, or a second one during LitServe's shutdown, cuts
    ``LitServer.run`` short of stopping them."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    deadline = time.monotonic() + grace
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from .engine import adapter_dirs, folder_task
    from .server import build_server

    task = folder_task(args.model)
    if args.adapters is not None:
        adapter_dirs(args.adapters)  # a missing folder fails here, not in the worker
    server = build_server(args.model, args.adapters, task, max_batch_size=args.max_batch_size,
                          batch_timeout=args.batch_timeout, max_new_tokens=args.max_new_tokens,
                          accelerator=args.accelerator)
    _interrupt_on_sigterm()
    try:
        server.run(host=args.host, port=args.port, log_level=args.log_level,
                   generate_client_file=False)
    finally:
        _end_children()


if __name__ == "__main__":
    main()
