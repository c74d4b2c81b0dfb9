"""`kubetune-serve`: an OpenAI-compatible HTTP server for a tuned model.

    kubetune-serve --model URI [--base-model URI] [--host 127.0.0.1] [--port 8000]
                   [--job JOB.yaml] [--no-history] [--max-queue N] [--max-batch N]
                   [--max-body-bytes N] [--served-model-name NAME] [--token-file FILE]

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /healthz
(process up), GET /readyz (200 once the model answered its warm-up generation), GET /metrics,
and GET /openapi.json (this API's OpenAPI document).
The port opens at once and the model loads in the background, so probes answer while a big
model loads. With a token (env KUBETUNE_SERVE_TOKEN or --token-file, mounted from a Secret)
every /v1 request needs `Authorization: Bearer TOKEN`; probes and metrics stay open.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Optional, TypeVar

import pydantic_core
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import exitcodes
from ..api.spec import GenerationSpec, SpecError, load_job
from ..api.uri import parse_uri
from ..artifacts.storage import StorageError
from .engine import Delta, Engine, EngineStopped, Failed, Finished, QueueFull, RequestHandle
from .metrics import ServeMetrics
from .protocol import (
    APIError,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChunk,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    Status,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    new_id,
    sse,
    usage_chunk,
    validation_error,
)

log = logging.getLogger("kubetune.serve")

TOKEN_ENV = "KUBETUNE_SERVE_TOKEN"
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/healthz", "/readyz", "/metrics", "/openapi.json")
MAX_BODY_BYTES = 2 * 1024**2  # a few times the text of a 128k-token context
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before its answer
T = TypeVar("T")


@dataclass
class ServeSettings:
    served_model_name: str
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    history: bool = True
    token: Optional[str] = None
    max_body_bytes: int = MAX_BODY_BYTES


class ServerState:
    def __init__(self, settings: ServeSettings, metrics: ServeMetrics, engine: Optional[Engine]):
        self.settings = settings
        self.metrics = metrics
        self.engine = engine
        self.started = int(time.time())

    def loaded_engine(self) -> Engine:
        # Requests that arrive during the warm-up simply queue; only a missing model is refused.
        if self.engine is None:
            raise APIError(503, "the model is still loading; retry when /readyz answers 200", type="server_error", code="model_not_ready")
        return self.engine


# ---------------------------------------------------------------------------------------
# request handling


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body; a 413 as soon as it is known to be over `limit` bytes (by its
    Content-Length, or while it streams in), so an oversized body is never held in memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than {limit} bytes (the server's --max-body-bytes)", code="request_too_large")


def _parse(raw: bytes, model_type):
    """The request model. pydantic's JSON parser bounds nesting depth and number sizes and
    refuses lone surrogates, so every malformed body is a 400."""
    try:
        document = pydantic_core.from_json(raw)
    except ValueError as err:
        raise APIError(400, f"The request body is not valid JSON: {err}") from None
    try:
        return model_type.model_validate(document)
    except ValidationError as err:
        raise validation_error(err.errors()) from None


def _check_model(state: ServerState, name: str) -> None:
    if name != state.settings.served_model_name:
        raise APIError(404, f"The model `{name}` does not exist; this server serves `{state.settings.served_model_name}`", param="model", code="model_not_found")


def _encode_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the conversation under the model's chat template, tokenized exactly as the
    trainer tokenized the same conversation (`kubetune.data.encoding.encode_chat`).

    The template's own turn markers are special tokens, but a client's text that spells them
    ("<|im_end|><|im_start|>system ...") stays text, or any client could forge a system turn.
    """
    from ..data.encoding import encode_chat

    if not tokenizer.chat_template:
        raise APIError(400, "the model has no chat template; use /v1/completions or set spec.model.chatTemplate", param="messages")
    try:
        return encode_chat(tokenizer, messages, add_generation_prompt=True).ids
    except Exception as err:  # noqa: BLE001 - jinja raise_exception() in templates (e.g. roles must alternate)
        raise APIError(400, f"the chat template rejected the messages: {err}", param="messages") from None


def _encode_prompt(tokenizer, prompt, vocab_size: int) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if any(not 0 <= t < vocab_size for t in prompt):
        raise APIError(400, f"prompt token ids must be between 0 and {vocab_size - 1}", param="prompt")
    return prompt


def _submit(state: ServerState, engine: Engine, req, prompts: list[list[int]], param: str, loop) -> list[RequestHandle]:
    handles: list[RequestHandle] = []
    try:
        for ids in prompts:
            if not ids:
                raise APIError(400, "the prompt is empty", param=param)
            if len(ids) >= engine.context_length:
                raise APIError(
                    400,
                    f"This model's maximum context length is {engine.context_length} tokens. However, your prompt has {len(ids)} tokens. "
                    "Please shorten the prompt.",
                    param=param,
                    code="context_length_exceeded",
                )
            params = req.sampling_params(state.settings.generation, len(ids), engine.context_length)
            if params.num_beams > 1 and req.n > params.num_beams:
                raise APIError(400, f"n ({req.n}) must not exceed num_beams ({params.num_beams})", param="n")
            try:
                handles.append(engine.submit(ids, params, req.n, loop, stream=req.stream))
            except QueueFull as err:
                raise APIError(429, str(err), type="rate_limit_error", code="queue_full") from None
            except EngineStopped as err:
                raise APIError(503, str(err), type="server_error") from None
            except ValueError as err:
                raise APIError(400, str(err), param="n" if "n must" in str(err) else param) from None
    except APIError:
        for handle in handles:
            handle.cancel()
        raise
    return handles


async def _collect(handle: RequestHandle) -> list[tuple[str, str, int]]:
    texts = [""] * handle.n
    results: list[Optional[tuple[str, str, int]]] = [None] * handle.n
    while any(r is None for r in results):
        event = await handle.next_event()
        if isinstance(event, Failed):
            raise APIError(500, event.message, type="server_error")
        if isinstance(event, Delta):
            texts[event.index] += event.text
        elif isinstance(event, Finished):
            results[event.index] = (texts[event.index], event.reason, len(event.token_ids))
    return results  # type: ignore[return-value]


async def _collect_all(handles: list[RequestHandle]) -> list[tuple[str, str, int]]:
    try:
        choices: list[tuple[str, str, int]] = []
        for handle in handles:
            choices += await _collect(handle)
        return choices
    finally:
        for handle in handles:
            handle.cancel()  # no-op for finished ones; frees the rows of a failed or abandoned request


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body has been read, so nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> Optional[T]:
    """`work`'s result, or None if the client disconnects first (then `work` is cancelled)."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, gone):
            if not pending.done():
                pending.cancel()
    return task.result() if task.done() and not task.cancelled() else None


def _prepare(state: ServerState, raw: bytes, chat: bool):
    """Parse, check and tokenize a request: (request, engine, prompt token ids, the prompt's
    field). Runs on a worker thread, so a big body never stalls the event loop."""
    req = _parse(raw, ChatCompletionRequest if chat else CompletionRequest)
    _check_model(state, req.model)
    engine = state.loaded_engine()
    req.check_supported()
    if chat:
        return req, engine, [_encode_chat(engine.tokenizer, req.conversation(state.settings.history))], "messages"
    texts = req.prompts()
    if len(texts) > engine.max_queue:  # would be a 429 that no retry can ever get past
        raise APIError(400, f"{len(texts)} prompts in one request; this server queues at most {engine.max_queue} (--max-queue)", param="prompt")
    vocab = engine.model.config.vocab_size
    return req, engine, [_encode_prompt(engine.tokenizer, p, vocab) for p in texts], "prompt"


async def _answer(state: ServerState, request: Request, chat: bool) -> Response:
    started = time.monotonic()
    raw = await _read_body(request, state.settings.max_body_bytes)
    req, engine, prompts, param = await run_in_threadpool(_prepare, state, raw, chat)
    handles = _submit(state, engine, req, prompts, param, asyncio.get_running_loop())
    prompt_tokens = sum(len(p) for p in prompts)
    name, rid = state.settings.served_model_name, new_id("chatcmpl" if chat else "cmpl")
    if req.stream:
        body = _stream(state, handles, req, chat, rid, name, prompt_tokens, started)
        return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    choices = await _unless_disconnected(request, _collect_all(handles))
    if choices is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it; counted in the metrics
    completion_tokens = sum(c[2] for c in choices)
    build = chat_response if chat else completion_response
    state.metrics.request_latency.observe(time.monotonic() - started)
    return JSONResponse(build(rid, name, [(c[0], c[1]) for c in choices], prompt_tokens, completion_tokens))


async def _stream(state: ServerState, handles: list[RequestHandle], req, chat: bool, rid: str, name: str, prompt_tokens: int, started: float) -> AsyncIterator[bytes]:
    completion_tokens = 0
    try:
        if chat:
            for index in range(req.n * len(handles)):
                yield sse(chat_chunk(rid, name, index, {"role": "assistant", "content": ""}))
        offset = 0
        for handle in handles:
            finished = 0
            while finished < handle.n:
                event = await handle.next_event()
                if isinstance(event, Failed):
                    yield sse(APIError(500, event.message, type="server_error").body())
                    return
                index = offset + event.index
                if isinstance(event, Delta):
                    yield sse(chat_chunk(rid, name, index, {"content": event.text}) if chat else completion_chunk(rid, name, index, event.text))
                else:
                    finished += 1
                    completion_tokens += len(event.token_ids)
                    yield sse(chat_chunk(rid, name, index, {}, event.reason) if chat else completion_chunk(rid, name, index, "", event.reason))
            offset += handle.n
        if req.include_usage:
            yield sse(usage_chunk(rid, name, "chat.completion.chunk" if chat else "text_completion", prompt_tokens, completion_tokens))
        yield sse("[DONE]")
        state.metrics.request_latency.observe(time.monotonic() - started)
    finally:
        for handle in handles:
            handle.cancel()  # the client left early: free its rows in the batch


# ---------------------------------------------------------------------------------------
# the application


# Answers the POST endpoints may give, besides 200 (OpenAPI `responses`).
_ERRORS = {
    400: "The request is invalid; `error.param` names the field.",
    401: "A bearer token is required (the server was started with one).",
    404: "The model named in the request is not served here.",
    413: "The body is larger than the server's --max-body-bytes.",
    429: "--max-queue requests are already waiting; retry after Retry-After seconds.",
    500: "Generation failed for this request.",
    503: "The model is still loading, or the server is shutting down.",
}


def _ref(model: type) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _post_docs(request_model: type, chunk_model: type, answer: str) -> dict[str, Any]:
    """The OpenAPI parts of a POST endpoint whose body is parsed by hand (see `_openapi_document`).
    A streamed answer is described event by event: each `data:` is a chunk (or an error), then `[DONE]`."""
    payload = {"anyOf": [_ref(chunk_model), _ref(ErrorResponse)]}
    data = {"anyOf": [{"const": "[DONE]"}, {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}]}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return dict(
        responses={200: {"description": f"{answer}; with `stream: true`, server-sent events", "content": {"text/event-stream": {"schema": event}}}}
        | {status: {"model": ErrorResponse, "description": text} for status, text in _ERRORS.items()},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request_model)}}}},
    )


def _openapi_document(app: FastAPI, settings: ServeSettings) -> dict[str, Any]:
    """OpenAPI 3.1 of our endpoints. The POST bodies are read by hand (size limit, parsed off
    the event loop), so their schemas come from the same pydantic models that parse them; the
    one model name this server answers to is part of them."""
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    description = "OpenAI-compatible serving of a model tuned with KubeTune: chat and text completions with per-request sampling, batched."
    doc = get_openapi(title=app.title, version=app.version, description=description, routes=app.routes)
    models = [(m, "validation") for m in (ChatCompletionRequest, CompletionRequest)] + [(m, "serialization") for m in (ChatCompletionChunk, CompletionChunk)]
    _, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
    for request_model in (ChatCompletionRequest, CompletionRequest):
        defs["$defs"][request_model.__name__]["properties"]["model"]["enum"] = [settings.served_model_name]
    components = doc.setdefault("components", {})
    components.setdefault("schemas", {}).update(defs["$defs"])
    if settings.token:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, operations in doc["paths"].items():
            for operation in operations.values() if path.startswith("/v1/") else ():
                operation["security"] = [{"bearer": []}]
    return doc


def _error_responses(app: FastAPI, state: ServerState):
    """Answer every error in OpenAI's shape, ours and Starlette's (unknown paths, wrong
    methods), counted in the metrics; returns the function that builds such an answer."""

    def error_response(request: Request, err: APIError, headers: Optional[dict[str, str]] = None) -> JSONResponse:
        endpoint = request.url.path if request.url.path in ENDPOINTS else "other"
        state.metrics.errors.labels(endpoint, err.type).inc()
        if err.status == 429:
            headers = {**(headers or {}), "Retry-After": "1"}
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return error_response(request, err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        # Unknown paths and wrong methods, in OpenAI's error shape like every other error.
        path = request.url.path
        if err.status_code == 404:
            api_error = APIError(404, f"There is no {path}; this server answers {', '.join(ENDPOINTS)}", code="not_found")
        elif err.status_code == 405:
            api_error = APIError(405, f"{request.method} is not allowed on {path}; use {(err.headers or {}).get('Allow')}", code="method_not_allowed")
        else:
            api_error = APIError(err.status_code, str(err.detail))
        return error_response(request, api_error, err.headers)

    return error_response


def create_app(settings: ServeSettings, metrics: Optional[ServeMetrics] = None, engine: Optional[Engine] = None) -> FastAPI:
    """The HTTP application. `engine` may be attached later (state.engine) once the model has loaded."""
    state = ServerState(settings, metrics or (engine.metrics if engine else ServeMetrics()), engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="kubetune-serve", version="v1", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.kubetune = state

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _openapi_document(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    error_response = _error_responses(app, state)

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next):
        path = request.url.path
        if path.startswith("/v1/") and settings.token and not _authorized(request, settings.token):
            response = error_response(
                request, APIError(401, "Incorrect or missing API key: send `Authorization: Bearer TOKEN`", code="invalid_api_key")
            )
        else:
            try:
                response = await call_next(request)
            except Exception as err:  # noqa: BLE001 - answered as a 500, the server keeps serving
                log.exception("request to %s failed", path)
                response = error_response(request, APIError(500, f"internal error: {type(err).__name__}", type="server_error"))
        state.metrics.requests.labels(path if path in ENDPOINTS else "other", str(response.status_code)).inc()
        return response

    @app.get("/healthz", response_model=Status)
    async def healthz():
        """The process is up."""
        return Status(status="ok").model_dump()

    @app.get("/readyz", response_model=Status, responses={503: {"model": Status, "description": "The model is loading or warming up."}})
    async def readyz():
        """200 once the model has answered its warm-up generation."""
        if state.engine is not None and state.engine.ready.is_set():
            return Status(status="ready", model=settings.served_model_name).model_dump()
        return JSONResponse(Status(status="loading").model_dump(), status_code=503)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus metrics"}})
    async def metrics_endpoint():
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", response_model=ModelList, responses={401: {"model": ErrorResponse, "description": _ERRORS[401]}})
    async def models():
        """The one model this server serves."""
        length = state.engine.context_length if state.engine is not None else None
        return ModelList(data=[ModelCard(id=settings.served_model_name, created=state.started, owned_by="kubetune", max_model_len=length)]).model_dump()

    @app.post("/v1/chat/completions", response_model=ChatCompletion, **_post_docs(ChatCompletionRequest, ChatCompletionChunk, "The answer"))
    async def chat_completions(request: Request):
        """Chat with the model (OpenAI's chat completions API, plus vLLM-style sampling fields)."""
        return await _answer(state, request, chat=True)

    @app.post("/v1/completions", response_model=Completion, **_post_docs(CompletionRequest, CompletionChunk, "The completions"))
    async def completions(request: Request):
        """Continue one or more prompts (text or token ids)."""
        return await _answer(state, request, chat=False)

    return app


def _authorized(request: Request, token: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


class BackgroundServer:
    """An app served by uvicorn on a thread of this process (tests, benchmarks, notebooks)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: Optional[int] = None):
        import uvicorn

        from ..artifacts.net import free_port

        self.host, self.port = host, port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, name="kubetune-serve-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


# ---------------------------------------------------------------------------------------
# command line


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kubetune-serve", description="OpenAI-compatible server for a tuned model.")
    p.add_argument("--model", required=True, help="Model or adapter location: s3://, file://, a path or pvc://.")
    p.add_argument("--base-model", help="Base model for an adapter (default: the adapter's base_model_name_or_path).")
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0 in a pod).")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--job", help="FineTuneJob file: generation defaults, history, chat template, storage endpoint, name.")
    p.add_argument("--no-history", action="store_true", help="Answer each question alone: keep only system prompts and the last user message.")
    p.add_argument("--max-queue", type=int, default=64, help="Requests allowed to wait; more get 429.")
    p.add_argument("--max-batch", type=int, default=16, help="Sequences generated together.")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="Largest request body; bigger ones get 413.")
    p.add_argument("--batch-window-ms", type=float, default=5.0, help="How long an idle model waits to gather requests.")
    p.add_argument("--served-model-name", help="Model name clients send (default: the job name, else the location's last part).")
    p.add_argument("--token-file", help=f"File holding the bearer token (default: env {TOKEN_ENV}).")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="Weights dtype (auto: fp32 on CPU).")
    p.add_argument("--cache-dir", default=os.environ.get("KUBETUNE_CACHE_DIR") or "/tmp/kubetune-serve", help="Where remote models are downloaded.")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    for name in ("max_queue", "max_batch", "max_body_bytes", "port"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def _settings(args: argparse.Namespace):
    job = load_job(args.job) if args.job else None
    token = os.environ.get(TOKEN_ENV, "").strip() or None
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
        if not token:
            raise ValueError(f"--token-file {args.token_file} is empty")
    name = args.served_model_name or (job.metadata.name if job else parse_uri(args.model).name or "model")
    serving = job.spec.serving if job else None
    settings = ServeSettings(
        served_model_name=name,
        generation=serving.generation if serving else GenerationSpec(),
        history=not args.no_history and (serving.history if serving else True),
        token=token,
        max_body_bytes=args.max_body_bytes,
    )
    load_kwargs = dict(
        base_model=args.base_model,
        cache_dir=Path(args.cache_dir),
        base_dir=Path(args.job).resolve().parent if args.job else None,
        endpoint=job.spec.storage.endpoint if job else None,
        dtype=args.dtype,
        chat_template=job.spec.model.chat_template if job else None,
        trust_remote_code=job.spec.model.trust_remote_code if job else False,
    )
    return settings, load_kwargs


def main(argv: Optional[list[str]] = None) -> None:
    import uvicorn

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        settings, load_kwargs = _settings(args)
    except (SpecError, OSError, ValueError) as err:
        print(f"kubetune-serve: {err}", file=sys.stderr)
        sys.exit(exitcodes.INVALID_INPUT)

    metrics = ServeMetrics()
    app = create_app(settings, metrics)
    state: ServerState = app.state.kubetune
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(), access_log=False))
    failure: list[Exception] = []

    def load() -> None:
        from .loader import load_model

        try:
            loaded = load_model(args.model, **load_kwargs)
            engine = Engine(
                loaded.model, loaded.tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                batch_window=args.batch_window_ms / 1000, metrics=metrics,
            )  # fmt: skip
            state.engine = engine
            engine.start()
            log.info("ready: serving %s as %r on %s:%d", args.model, settings.served_model_name, args.host, args.port)
        except Exception as err:  # noqa: BLE001 - reported, then the process exits non-zero
            log.exception("loading %s failed", args.model)
            failure.append(err)
            server.should_exit = True

    threading.Thread(target=load, name="kubetune-serve-load", daemon=True).start()
    server.run()
    if failure:
        err = failure[0]
        print(f"kubetune-serve: could not load the model: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(exitcodes.STORAGE_ERROR if isinstance(err, StorageError) else exitcodes.INVALID_INPUT if isinstance(err, (OSError, ValueError)) else 1)


if __name__ == "__main__":
    main()
