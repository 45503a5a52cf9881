"""The HTTP layer: a Starlette app with OpenAI-compatible endpoints over an :class:`Engine`.

==========================  ===========================================================================
``GET  /health``            ``{"status": "ok"}`` (503 ``draining`` while shutting down)
``GET  /metrics``           Prometheus text
``GET  /v1/models``         the base model (its name: no adapter) and every adapter folder
``POST /v1/embeddings``     encoder models; ``input``: string, strings, token ids or lists of them;
                            ``encoding_format`` ``float`` or ``base64`` (little-endian float32)
``POST /v1/completions``    causal LMs; ``prompt`` as above, ``max_tokens`` (16), ``temperature`` (1.0;
                            0 = greedy), ``top_p`` (1.0), ``stream`` (server-sent events, ``[DONE]``)
``POST /v1/classify``       sequence classifiers; per input: ``label``, ``score`` (softmax), ``logits``
``POST /v1/adapters``       bearer token; a tar archive body (``?name=``) or JSON ``{"name", "path"}``
``DELETE /v1/adapters/x``   bearer token; unloads adapter ``x`` and deletes its folder
==========================  ===========================================================================

The request's ``model`` field picks the adapter (the base model's name: none). Errors are OpenAI's
JSON shape ``{"error": {"message", "type", "param", "code"}}``: 404 unknown adapter or endpoint, 413
body over the limit (``max_request_bytes``, uploads ``max_upload_bytes``), 422 malformed input, 401
missing or wrong token, 403 uploads off (no token configured), 503 queue full or shutting down (with
``Retry-After``). Bodies are read incrementally and cut off at the limit, whatever Content-Length says.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import tempfile
import time
import uuid
from pathlib import Path

import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from ..errors import AdapterNotFoundError, RankwiseError
from .cache import NAME_RE
from .engine import Closed, Engine, Job, QueueFull
from .uploads import UploadError, read_adapter_tar, stage

ENDPOINTS = {"completions": "/v1/completions", "classify": "/v1/classify", "embeddings": "/v1/embeddings"}
UNSUPPORTED = ("suffix", "logprobs", "echo", "stop", "logit_bias")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
                 headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def error_response(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def create_app(engine: Engine, *, base_name: str, token: str | None = None, max_request_bytes: int = 1 << 20,
               max_upload_bytes: int = 256 << 20, max_tokens_limit: int = 1024) -> Starlette:
    """The app. ``token``: bearer token for ``/v1/adapters`` (``None``: those endpoints are off)."""
    metrics = engine.metrics

    # ---- helpers --------------------------------------------------------------------------------------
    async def read_body(request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit} bytes.",
                           code="request_too_large")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                raise ApiError(413, f"request body is over the limit of {limit} bytes.", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_json(request: Request) -> dict:
        body = await read_body(request, max_request_bytes)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(422, f"the body is not valid JSON ({e}).") from None
        if not isinstance(data, dict):
            raise ApiError(422, "the body must be a JSON object.")
        return data

    def adapter_of(data: dict) -> str | None:
        model = data.get("model", base_name)
        if model is None or model == base_name:
            return None
        if not isinstance(model, str):
            raise ApiError(422, "'model' must be a string: the base model's name or an adapter's.", param="model")
        if not engine.cache.exists(model):
            raise ApiError(404, f"the model '{model}' does not exist: serve '{base_name}' (no adapter) or an adapter "
                                "listed by GET /v1/models.", param="model", code="model_not_found")
        return model

    def tokens_of(value, param: str) -> list[list[int]]:
        def ids(seq):
            if not seq or not all(isinstance(t, int) and not isinstance(t, bool) for t in seq):
                raise ApiError(422, f"'{param}' token lists must be non-empty lists of integers.", param=param)
            vocab = getattr(getattr(engine.model, "config", None), "vocab_size", None)
            if vocab is not None and any(t < 0 or t >= vocab for t in seq):
                raise ApiError(422, f"'{param}' holds a token id outside 0..{vocab - 1}.", param=param)
            return list(seq)

        def text(s):
            if engine.tokenizer is None:
                raise ApiError(422, "this model has no tokenizer; send token ids instead of text.", param=param)
            out = engine.tokenizer(s, add_special_tokens=engine.task != "completions")["input_ids"]
            if not out:
                raise ApiError(422, f"'{param}' holds an empty string.", param=param)
            return out

        if isinstance(value, str):
            items = [text(value)]
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            items = [text(v) for v in value]
        elif isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            items = [ids(value)]
        elif isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            items = [ids(v) for v in value]
        else:
            raise ApiError(422, f"'{param}' must be a string, a list of strings, a list of token ids or a list of "
                                "such lists (non-empty).", param=param)
        if len(items) > engine.max_batch:
            raise ApiError(422, f"'{param}' holds {len(items)} inputs; at most {engine.max_batch} per request "
                                "(--max-batch).", param=param)
        return items

    def number(data, key, default, lo, hi, integer=False):
        v = data.get(key, default)
        if v is None:
            v = default
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if not ok or isinstance(v, bool) or not (lo <= v <= hi):
            kind = "an integer" if integer else "a number"
            raise ApiError(422, f"'{key}' must be {kind} in [{lo}, {hi}]; got {v!r}.", param=key)
        return v

    def submit(job: Job):
        """Queue ``job``; a full queue or a closing server is a 503 with Retry-After."""
        try:
            return engine.submit(job)
        except QueueFull as e:
            metrics.inc("rejected_total", reason="queue_full")
            raise ApiError(503, f"server busy: {e}; retry shortly.", "server_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except Closed:
            raise ApiError(503, "the server is shutting down.", "server_error", code="shutting_down",
                           headers={"Retry-After": "5"}) from None

    async def run_job(job: Job):
        fut = submit(job)
        try:
            return await asyncio.wrap_future(fut)
        except AdapterNotFoundError as e:
            raise ApiError(404, str(e), param="model", code="model_not_found") from None

    def check_token(request: Request) -> None:
        if token is None:
            raise ApiError(403, "adapter upload and delete are off: start the server with RANKWISE_TOKEN set or "
                                "--token-file.", "permission_error")
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ApiError(401, "missing or wrong bearer token (header 'Authorization: Bearer <token>').",
                           "authentication_error", headers={"WWW-Authenticate": "Bearer"})

    def check_task(kind: str) -> None:
        if engine.task != kind:
            raise ApiError(404, f"this server's model does not serve {ENDPOINTS[kind]}: it is a {engine.task} model; "
                                f"use {ENDPOINTS[engine.task]}.", code="wrong_endpoint")

    def usage(items, completion=0):
        prompt = sum(len(i) for i in items)
        out = {"prompt_tokens": prompt, "total_tokens": prompt + completion}
        if engine.task == "completions":
            out["completion_tokens"] = completion
        return out

    # ---- endpoints ----------------------------------------------------------------------------------
    async def health(request):
        if engine.closing:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok", "task": engine.task, "model": base_name})

    async def metrics_text(request):
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(request):
        now = int(time.time())
        data = [{"id": base_name, "object": "model", "created": now, "owned_by": "rankwise"}]
        data += [{"id": n, "object": "model", "created": now, "owned_by": "rankwise", "parent": base_name}
                 for n in engine.cache.available()]
        return JSONResponse({"object": "list", "data": data})

    async def encoder_request(request, task: str):
        """``(body, adapter, token lists)`` of an embeddings / classify request, checked."""
        check_task(task)
        data = await read_json(request)
        adapter = adapter_of(data)
        items = tokens_of(data.get("input"), "input")
        check_lengths(items, 0)
        return data, adapter, items

    async def embeddings(request):
        data, adapter, items = await encoder_request(request, "embeddings")
        fmt = data.get("encoding_format", "float") or "float"
        if fmt not in ("float", "base64"):
            raise ApiError(422, "'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
        vectors = await run_job(Job("embeddings", adapter, items))
        out = []
        for i, v in enumerate(vectors):
            emb = (base64.b64encode(v.to(torch.float32).numpy().astype("<f4").tobytes()).decode()
                   if fmt == "base64" else v.tolist())
            out.append({"object": "embedding", "index": i, "embedding": emb})
        return JSONResponse({"object": "list", "data": out, "model": data.get("model", base_name),
                             "usage": usage(items)})

    async def classify(request):
        data, adapter, items = await encoder_request(request, "classify")
        logits = await run_job(Job("classify", adapter, items))
        labels = getattr(engine.model.config, "id2label", None) or {}
        probs = logits.softmax(-1)
        out = []
        for i, (lg, p) in enumerate(zip(logits, probs)):
            k = int(p.argmax())
            out.append({"object": "classification", "index": i, "label": labels.get(k, str(k)),
                        "score": float(p[k]), "logits": lg.tolist()})
        return JSONResponse({"object": "list", "data": out, "model": data.get("model", base_name),
                             "usage": usage(items)})

    def check_lengths(items, extra):
        limit = engine.max_positions
        if limit is None:
            return
        for i, it in enumerate(items):
            if len(it) + extra > limit:
                raise ApiError(422, f"input {i} has {len(it)} tokens{f' + {extra} to generate' if extra else ''}, "
                                    f"over the model's {limit} positions.", code="context_length_exceeded")

    async def completions(request):
        check_task("completions")
        data = await read_json(request)
        adapter = adapter_of(data)
        items = tokens_of(data.get("prompt"), "prompt")
        max_tokens = number(data, "max_tokens", 16, 1, max_tokens_limit, integer=True)
        temperature = float(number(data, "temperature", 1.0, 0.0, 2.0))
        top_p = float(number(data, "top_p", 1.0, 1e-6, 1.0))
        n = number(data, "n", 1, 1, 1, integer=True)
        best_of = data.get("best_of")
        if best_of not in (None, 1) or n != 1:
            raise ApiError(422, "'n' and 'best_of' other than 1 are not supported.", param="n")
        for key in UNSUPPORTED:
            if data.get(key) not in (None, False, [], ""):
                raise ApiError(422, f"'{key}' is not supported by this server.", param=key)
        for key in ("presence_penalty", "frequency_penalty"):
            if data.get(key) not in (None, 0, 0.0):
                raise ApiError(422, f"'{key}' is not supported by this server (only 0).", param=key)
        stream = data.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(422, "'stream' must be true or false.", param="stream")
        check_lengths(items, max_tokens)
        model_name = data.get("model", base_name)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        job = Job("completions", adapter, items, max_tokens=[max_tokens] * len(items),
                  sampling=(temperature, top_p))
        if not stream:
            rows = await run_job(job)
            choices = [{"text": decode(toks), "index": i, "logprobs": None, "finish_reason": why}
                       for i, (toks, why) in enumerate(rows)]
            return JSONResponse({"id": cid, "object": "text_completion", "created": created, "model": model_name,
                                 "choices": choices, "usage": usage(items, sum(len(t) for t, _ in rows))})
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.on_tokens = lambda k, t, why: loop.call_soon_threadsafe(events.put_nowait, (k, t, why))
        wrapped = asyncio.wrap_future(submit(job))

        async def sse():
            toks = [[] for _ in items]
            sent = [""] * len(items)
            left = len(items)
            while left:
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, wrapped}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    if wrapped.exception() is not None:  # the batch failed: say so in the stream
                        err = {"error": {"message": str(wrapped.exception()), "type": "server_error",
                                         "param": None, "code": None}}
                        yield f"data: {json.dumps(err)}\n\n"
                        return
                    if events.empty():
                        break
                    continue
                k, t, why = getter.result()
                if t is not None:
                    toks[k].append(t)
                    full = decode(toks[k])
                    delta = full[len(sent[k]):] if full.startswith(sent[k]) else ""
                    if not delta:
                        continue
                    sent[k] = full
                    choice = {"text": delta, "index": k, "logprobs": None, "finish_reason": None}
                else:
                    full = decode(toks[k])
                    delta = full[len(sent[k]):] if full.startswith(sent[k]) else ""
                    sent[k] = full
                    left -= 1
                    choice = {"text": delta, "index": k, "logprobs": None, "finish_reason": why}
                chunk = {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                         "choices": [choice]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def decode(toks: list[int]) -> str:
        if engine.tokenizer is None:
            return " ".join(map(str, toks))
        return engine.tokenizer.decode(toks, skip_special_tokens=True)

    async def upload(request):
        check_token(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        with tempfile.TemporaryDirectory(prefix="rankwise-upload-") as tmp:
            if ctype == "application/json":
                data = await read_json(request)
                name, path = data.get("name"), data.get("path")
                if not isinstance(path, str) or not path:
                    raise ApiError(422, "JSON uploads name a server-side adapter folder: {\"name\": ..., \"path\": ...}.",
                                   param="path")
                staged = Path(path)
                if not (staged / "adapter_config.json").is_file() or not (staged / "adapter_model.safetensors").is_file():
                    raise ApiError(422, f"{path} is not an adapter folder (adapter_config.json + "
                                        "adapter_model.safetensors).", param="path")
            else:
                name = request.query_params.get("name")
                check_name_param(name)
                body = await read_body(request, max_upload_bytes)
                staged = stage(read_adapter_tar(body, max_upload_bytes), Path(tmp) / "adapter")
            check_name_param(name)
            result = await asyncio.wrap_future(engine.call(lambda: engine.cache.install(name, staged)))
        return JSONResponse({"id": name, "object": "model", "bytes": result["bytes"], "replaced": result["replaced"]},
                            status_code=201)

    def check_name_param(name):
        if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name == base_name:
            raise ApiError(422, f"adapter name {name!r}: use 1-128 letters, digits, '.', '_' or '-' (starting with a "
                                f"letter or digit), other than the base model's name '{base_name}'.", param="name")

    async def remove(request):
        check_token(request)
        name = request.path_params["name"]
        if not engine.cache.exists(name):
            raise ApiError(404, f"no adapter '{name}'.", param="name", code="model_not_found")
        await asyncio.wrap_future(engine.call(lambda: engine.cache.remove(name)))
        return JSONResponse({"id": name, "object": "model", "deleted": True})

    # ---- wiring --------------------------------------------------------------------------------------
    def observed(endpoint: str, handler):
        async def wrapped(request):
            t0 = time.perf_counter()
            try:
                response = await handler(request)
            except ApiError as e:
                response = error_response(e.status, e.message, e.type, e.param, e.code, e.headers)
            except (UploadError, RankwiseError) as e:
                response = error_response(422, str(e), "invalid_request_error")
            except Closed:
                response = error_response(503, "the server is shutting down.", "server_error", headers={"Retry-After": "5"})
            metrics.inc("requests_total", endpoint=endpoint, code=response.status_code)
            if not isinstance(response, StreamingResponse):
                metrics.observe("request_seconds", time.perf_counter() - t0, endpoint=endpoint)
            return response

        return wrapped

    routes = [
        Route("/health", observed("/health", health), methods=["GET"]),
        Route("/metrics", metrics_text, methods=["GET"]),
        Route("/v1/models", observed("/v1/models", models), methods=["GET"]),
        Route("/v1/embeddings", observed("/v1/embeddings", embeddings), methods=["POST"]),
        Route("/v1/completions", observed("/v1/completions", completions), methods=["POST"]),
        Route("/v1/classify", observed("/v1/classify", classify), methods=["POST"]),
        Route("/v1/adapters", observed("/v1/adapters", upload), methods=["POST"]),
        Route("/v1/adapters/{name}", observed("/v1/adapters/{name}", remove), methods=["DELETE"]),
    ]

    async def http_error(request, exc: HTTPException):
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind,
                              headers=getattr(exc, "headers", None))

    async def server_error(request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)

    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, Exception: server_error})

