"""`kubetune-serve`: an OpenAI-compatible HTTP server for a tuned model.

    kubetune-serve --model URI [--base-model URI] [--host 127.0.0.1] [--port 8000]
                   [--job JOB.yaml] [--no-history] [--max-queue N] [--max-batch N]
                   [--served-model-name NAME] [--token-file FILE]

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /healthz
(process up), GET /readyz (200 once the model answered its warm-up generation), GET /metrics.
The port opens at once and the model loads in the background, so probes answer while a big
model loads. With a token (env KUBETUNE_SERVE_TOKEN or --token-file, mounted from a Secret)
every /v1 request needs `Authorization: Bearer TOKEN`; probes and metrics stay open.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from .. import exitcodes
from ..spec import GenerationSpec, SpecError, load_job
from ..storage import StorageError
from ..uri import parse_uri
from .engine import Delta, Engine, EngineStopped, Failed, Finished, QueueFull, RequestHandle
from .metrics import ServeMetrics
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
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
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/healthz", "/readyz", "/metrics")


@dataclass
class ServeSettings:
    served_model_name: str
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    history: bool = True
    token: Optional[str] = None


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


async def _parse(request: Request, model_type):
    raw = await request.body()
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"The request body is not valid JSON: {err}") from None
    if not isinstance(document, dict):
        raise APIError(400, "The request body must be a JSON object")
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
    try:
        while any(r is None for r in results):
            event = await handle.next_event()
            if isinstance(event, Failed):
                raise APIError(500, event.message, type="server_error")
            if isinstance(event, Delta):
                texts[event.index] += event.text
            elif isinstance(event, Finished):
                results[event.index] = (texts[event.index], event.reason, len(event.token_ids))
    finally:
        if any(r is None for r in results):
            handle.cancel()
    return results  # type: ignore[return-value]


async def _answer(state: ServerState, request: Request, chat: bool) -> Response:
    started = time.monotonic()
    req = await _parse(request, ChatCompletionRequest if chat else CompletionRequest)
    _check_model(state, req.model)
    engine = state.loaded_engine()
    req.check_supported()
    if chat:
        prompts, param = [_encode_chat(engine.tokenizer, req.conversation(state.settings.history))], "messages"
    else:
        vocab = engine.model.config.vocab_size
        prompts, param = [_encode_prompt(engine.tokenizer, p, vocab) for p in req.prompts()], "prompt"
    handles = _submit(state, engine, req, prompts, param, asyncio.get_running_loop())
    prompt_tokens = sum(len(p) for p in prompts)
    name, rid = state.settings.served_model_name, new_id("chatcmpl" if chat else "cmpl")
    if req.stream:
        body = _stream(state, handles, req, chat, rid, name, prompt_tokens, started)
        return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        choices: list[tuple[str, str, int]] = []
        for handle in handles:
            choices += await _collect(handle)
    finally:
        for handle in handles:
            handle.cancel()  # no-op for finished ones; stops the rest if this request failed
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


def create_app(settings: ServeSettings, metrics: Optional[ServeMetrics] = None, engine: Optional[Engine] = None) -> FastAPI:
    """The HTTP application. `engine` may be attached later (state.engine) once the model has loaded."""
    state = ServerState(settings, metrics or (engine.metrics if engine else ServeMetrics()), engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="kubetune-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.kubetune = state

    def error_response(request: Request, err: APIError) -> JSONResponse:
        endpoint = request.url.path if request.url.path in ENDPOINTS else "other"
        state.metrics.errors.labels(endpoint, err.type).inc()
        headers = {"Retry-After": "1"} if err.status == 429 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return error_response(request, err)

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

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if state.engine is not None and state.engine.ready.is_set():
            return {"status": "ready", "model": settings.served_model_name}
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    async def metrics_endpoint():
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        card: dict[str, Any] = {"id": settings.served_model_name, "object": "model", "created": state.started, "owned_by": "kubetune"}
        if state.engine is not None:
            card["max_model_len"] = state.engine.context_length
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _answer(state, request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
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

        from ..testing import free_port

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
    p.add_argument("--batch-window-ms", type=float, default=5.0, help="How long an idle model waits to gather requests.")
    p.add_argument("--served-model-name", help="Model name clients send (default: the job name, else the location's last part).")
    p.add_argument("--token-file", help=f"File holding the bearer token (default: env {TOKEN_ENV}).")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="Weights dtype (auto: fp32 on CPU).")
    p.add_argument("--cache-dir", default=os.environ.get("KUBETUNE_CACHE_DIR") or "/tmp/kubetune-serve", help="Where remote models are downloaded.")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    for name in ("max_queue", "max_batch", "port"):
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
