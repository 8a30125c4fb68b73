"""The HTTP side: a LitServe server whose one inference worker holds the
:class:`~lora_lightning.serve.engine.ServedModel`.

LitServe's dynamic batching (``max_batch_size``, ``batch_timeout``) collects concurrent
requests into one batch for the worker, which runs them in one
:func:`~lora_lightning.per_sample_adapters` pass. The adapter routes (``GET/POST
/adapters``, ``DELETE /adapters/<name>``) travel through the same queue to the same worker,
so a hot-load or a delete happens between two batches, never inside one, and the worker's
model is the one source of truth. Requests are checked here, in the HTTP process, before
they are queued: bad JSON or a missing field is a 400 with one sentence.
"""

from __future__ import annotations

import json
from typing import Any

import litserve as ls
from fastapi import Request
from fastapi.responses import JSONResponse
from litserve.server import RegularRequestHandler

from .engine import GENERATE, ServedModel


class AdapterAPI(ls.LitAPI):
    """The worker: loads the model in ``setup`` and answers each batch with
    :meth:`ServedModel.run`."""

    def __init__(self, model: str, adapters: str | None, max_new_tokens: int = 64,
                 max_batch_size: int = 16, batch_timeout: float = 0.01) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout,
                         api_path="/predict")
        self.model_folder, self.adapters_folder = model, adapters
        self.max_new_tokens = max_new_tokens
        self.served: ServedModel | None = None

    def setup(self, device: str) -> None:
        import torch

        self.served = ServedModel.load(self.model_folder, self.adapters_folder,
                                       self.max_new_tokens)
        if device != "cpu":
            self.served.model.to(torch.device(device))

    def decode_request(self, request: dict) -> dict:
        return request

    def batch(self, inputs: list[dict]) -> list[dict]:
        return list(inputs)

    def predict(self, x: Any) -> Any:
        # max_batch_size=1 takes LitServe's unbatched loop: one request, not a list.
        return self.served.run(x) if isinstance(x, list) else self.served.run([x])[0]

    def unbatch(self, output: list[dict]) -> list[dict]:
        return output

    def encode_response(self, output: dict) -> dict:
        return output


def _bad(message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=400)


async def _json_object(request: Request) -> dict | JSONResponse:
    body = await request.body()
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return _bad("the request body is not valid JSON; send an object such as "
                    '{"adapter": "sentiment", "text": "..."}')
    if not isinstance(data, dict):
        return _bad(f"the request body must be a JSON object, not {type(data).__name__}")
    return data


def _check_predict(data: dict, task: str, max_new_tokens: int) -> dict | JSONResponse:
    for key in ("adapter", "text"):
        if key not in data:
            return _bad(f"the field {key!r} is missing; send "
                        '{"adapter": "<name>" or null, "text": "..."}')
    if data["adapter"] is not None and not isinstance(data["adapter"], str):
        return _bad(f"'adapter' must be an adapter name or null, not {data['adapter']!r}")
    if not isinstance(data["text"], str) or not data["text"]:
        return _bad(f"'text' must be a non-empty string, not {data['text']!r}")
    req = {"op": "predict", "adapter": data["adapter"], "text": data["text"]}
    if task == GENERATE:
        n = data.get("max_new_tokens", max_new_tokens)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_new_tokens:
            return _bad(f"'max_new_tokens' must be an integer from 1 to {max_new_tokens} "
                        f"(the server's --max-new-tokens), not {n!r}")
        req["max_new_tokens"] = n
    return req


def build_server(model: str, adapters: str | None, task: str, *, max_batch_size: int = 16,
                 batch_timeout: float = 0.01, max_new_tokens: int = 64,
                 accelerator: str = "auto", timeout: float = 60) -> ls.LitServer:
    """A LitServer with ``/predict`` and the adapter routes (``task`` from
    :func:`~lora_lightning.serve.engine.model_task`, so requests are checked before the
    worker has loaded the model)."""
    api = AdapterAPI(model, adapters, max_new_tokens, max_batch_size, batch_timeout)
    server = ls.LitServer(api, accelerator=accelerator, timeout=timeout)
    handler = RegularRequestHandler(api, server)
    app = server.app
    # LitServe's own /predict parses JSON with no answer for bad input but a 500; this
    # route checks the request first and queues a plain dict to the same worker.
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != "/predict"]

    async def ask(req: dict) -> JSONResponse:
        answer = await handler.handle_request(req, dict)
        return JSONResponse(answer["body"], status_code=answer["status"])

    async def predict(request: Request) -> JSONResponse:
        data = await _json_object(request)
        if isinstance(data, JSONResponse):
            return data
        req = _check_predict(data, task, max_new_tokens)
        return req if isinstance(req, JSONResponse) else await ask(req)

    async def list_all() -> JSONResponse:
        return await ask({"op": "list"})

    async def add(request: Request) -> JSONResponse:
        data = await _json_object(request)
        if isinstance(data, JSONResponse):
            return data
        for key in ("name", "path"):
            if not isinstance(data.get(key), str) or not data[key]:
                return _bad(f"the field {key!r} is missing or not a string; send "
                            '{"name": "<adapter name>", "path": "<adapter directory>"}')
        return await ask({"op": "load", "name": data["name"], "path": data["path"]})

    async def remove(name: str) -> JSONResponse:
        return await ask({"op": "delete", "name": name})

    app.add_api_route("/predict", predict, methods=["POST"])
    app.add_api_route("/adapters", list_all, methods=["GET"])
    app.add_api_route("/adapters", add, methods=["POST"])
    app.add_api_route("/adapters/{name}", remove, methods=["DELETE"])
    return server
