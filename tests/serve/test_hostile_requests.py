"""Hostile requests against a real `kubetune-serve` app (uvicorn on 127.0.0.1): one client's
bad request never hurts another client, and is answered with an OpenAI-style 4xx naming
what is wrong, never a 500.

Each case here was found by hand or by schemathesis (issue 18); the schema-driven run
itself is in test_openapi.py."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from kubetune.api.spec import GenerationSpec
from kubetune.serve.server import ServeSettings

HI = [{"role": "user", "content": "Hi"}]


def _chat(**fields) -> dict:
    return {"model": "tiny", "messages": HI, **fields}


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def _stream_pieces(url: str, body: dict, started: threading.Event | None = None) -> list[str]:
    """The content pieces of a streamed chat answer, in order; fails on an error event."""
    pieces = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            content = event["choices"][0]["delta"].get("content")
            if content:
                pieces.append(content)
                if started is not None:
                    started.set()
    return pieces


@pytest.fixture
def server(start_server):
    url, engine = start_server(ServeSettings("tiny", GenerationSpec(max_tokens=20)), max_batch=8)
    return url, engine


# The three requests of issue 18 that aborted every client's generation, and what they get now.
POISON = [
    ({"seed": 18446744073709551616}, "seed"),
    ({"temperature": 1e-40}, "temperature"),
    ({"repetition_penalty": 5e-324}, "repetition_penalty"),
]


def test_poison_requests_get_400s_while_an_innocent_stream_runs_on_unchanged(server):
    url, engine = server
    innocent = _chat(temperature=0, max_tokens=120, ignore_eos=True)
    alone = _stream_pieces(url, innocent)
    started, result = threading.Event(), {}
    stream = threading.Thread(target=lambda: result.setdefault("pieces", _stream_pieces(url, innocent, started)))
    stream.start()
    assert started.wait(60)
    for fields, param in POISON * 2:
        for stream_it in (False, True):
            response = httpx.post(f"{url}/v1/chat/completions", json=_chat(stream=stream_it, max_tokens=8, **fields), timeout=60)
            assert response.status_code == 400, response.text
            assert _error(response)["param"] == param
    stream.join(120)
    assert result["pieces"] == alone  # byte for byte what it streams alone


@pytest.mark.parametrize(
    "fields, param",
    [
        *POISON,
        ({"seed": -(2**63) - 1}, "seed"),
        ({"temperature": 2.5}, "temperature"),
        ({"repetition_penalty": 1e300}, "repetition_penalty"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2**64}, "top_k"),
        ({"max_tokens": 2**63}, "max_tokens"),
        ({"no_repeat_ngram_size": 2**70}, "no_repeat_ngram_size"),
        ({"n": 0}, "n"),
        ({"stop": ["x"] * 17}, "stop"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else "",
)
def test_sampling_parameters_are_checked_before_generation(server, fields, param):
    url, engine = server
    response = httpx.post(f"{url}/v1/chat/completions", json=_chat(**fields), timeout=60)
    assert response.status_code == 400, response.text
    error = _error(response)
    assert error["param"] == param and error["message"].startswith(f"{param}: "), error


def test_the_extreme_ends_of_every_range_are_served(server):
    url, engine = server
    for fields in ({"seed": 2**64 - 1}, {"seed": -(2**63)}, {"temperature": 0.01}, {"repetition_penalty": 0.01}, {"repetition_penalty": 100}):
        response = httpx.post(f"{url}/v1/chat/completions", json=_chat(max_tokens=4, **fields), timeout=60)
        assert response.status_code == 200, (fields, response.text)


def _raw(path: str, model: bytes = b'"tiny"', text: bytes = b'"Hi"', extra: bytes = b"") -> bytes:
    """A request body written by hand (what json.dumps would never produce)."""
    prompt = b'"messages": [{"role": "user", "content": ' + text + b"}]" if path == "/v1/chat/completions" else b'"prompt": ' + text
    return b'{"model": ' + model + b", " + prompt + extra + b"}"


MALFORMED = {
    "nested-5000-deep": {"extra": b', "stop": ' + b"[" * 5000 + b"]" * 5000},
    "5000-digit-max_tokens": {"extra": b', "max_tokens": ' + b"9" * 5000},
    "lone-surrogate-in-prompt": {"text": b'"Hi \\ud800"'},
    "lone-surrogate-in-model": {"model": b'"\\udfff"'},
    "nan": {"extra": b', "temperature": NaN'},
    "float-overflow": {"extra": b', "top_p": 1e999'},
}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_bodies_are_400s(server, case, path):
    url, engine = server
    body = _raw(path, **MALFORMED[case])
    response = httpx.post(f"{url}{path}", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400, (body[:80], response.text[:300])
    _error(response)
    assert httpx.post(f"{url}{path}", content=_raw(path, extra=b', "max_tokens": 2'), timeout=60).status_code == 200


def test_unknown_paths_and_wrong_methods_get_openai_errors(server):
    url, engine = server
    response = httpx.get(f"{url}/v1/engines")
    assert response.status_code == 404 and _error(response)["code"] == "not_found"
    response = httpx.get(f"{url}/v1/chat/completions")
    assert response.status_code == 405 and _error(response)["code"] == "method_not_allowed"
    assert response.headers["allow"] == "POST"
    response = httpx.delete(f"{url}/healthz")
    assert response.status_code == 405 and _error(response)["type"] == "invalid_request_error"


def test_more_prompts_than_the_queue_holds_is_a_400_not_a_retry(start_server):
    url, engine = start_server(max_batch=4, max_queue=8)
    assert engine.queue_depth == 0
    response = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": ["Hi"] * 9, "max_tokens": 2}, timeout=60)
    assert response.status_code == 400, response.text
    error = _error(response)
    assert error["param"] == "prompt" and "8" in error["message"]
    assert "retry-after" not in response.headers
    full = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": ["Hi"] * 8, "max_tokens": 2}, timeout=60)
    assert full.status_code == 200 and len(full.json()["choices"]) == 8


def test_bodies_over_the_limit_get_413_before_they_are_read(start_server):
    url, engine = start_server(ServeSettings("tiny", max_body_bytes=4096))
    big = json.dumps(_chat(max_tokens=2, stop=["x" * 5000])).encode()
    response = httpx.post(f"{url}/v1/chat/completions", content=big, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 413
    assert _error(response)["code"] == "request_too_large" and "4096" in _error(response)["message"]

    def chunks():  # no Content-Length: the limit holds while the body streams in
        for _ in range(64):
            yield b" " * 1024

    response = httpx.post(f"{url}/v1/completions", content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 413
    small = json.dumps(_chat(max_tokens=2)).encode()
    assert httpx.post(f"{url}/v1/chat/completions", content=small, headers={"content-type": "application/json"}, timeout=60).status_code == 200


class _GatedTokenizer:
    """The real tokenizer, except that a call on a long text waits for the test to open the gate
    (so the test decides when tokenization ends, instead of measuring how long it takes)."""

    def __init__(self, inner):
        self._inner = inner
        self.entered = threading.Event()
        self.gate = threading.Event()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, text, *args, **kwargs):
        if isinstance(text, str) and len(text) > 100_000:
            self.entered.set()
            assert self.gate.wait(120)
        return self._inner(text, *args, **kwargs)


def test_probes_answer_while_a_big_body_is_tokenized(start_server, tiny):
    tokenizer = _GatedTokenizer(tiny.tokenizer)
    url, engine = start_server(tokenizer=tokenizer)
    result = {}
    big = _chat(messages=[{"role": "user", "content": "word " * 60_000}])
    sender = threading.Thread(target=lambda: result.setdefault("response", httpx.post(f"{url}/v1/chat/completions", json=big, timeout=180)))
    sender.start()
    assert tokenizer.entered.wait(60)
    # Tokenization is under way and cannot finish until the gate opens: the probe must answer first.
    assert httpx.get(f"{url}/healthz", timeout=60).status_code == 200
    assert httpx.get(f"{url}/readyz", timeout=60).status_code == 200
    assert "response" not in result
    tokenizer.gate.set()
    sender.join(180)
    assert result["response"].status_code == 400
    assert _error(result["response"])["code"] == "context_length_exceeded"


def _raw_request(url: str, body: dict) -> socket.socket:
    """Send a request on a plain socket, so the test decides exactly when the client leaves."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    return sock


@pytest.mark.parametrize("fields", [{"n": 4}, {"n": 2, "num_beams": 2}], ids=["batched", "beam-search"])
def test_a_non_streamed_client_that_leaves_frees_its_rows(server, fields):
    url, engine = server
    body = _chat(max_tokens=480, ignore_eos=True, temperature=0, **fields)
    before = engine.metrics.generated_tokens._value.get()
    sock = _raw_request(url, body)
    deadline = time.monotonic() + 60
    while engine.running < fields["n"] and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.running == fields["n"]  # generating
    sock.close()
    while engine.running and time.monotonic() < deadline + 60:
        time.sleep(0.01)
    assert engine.running == 0
    assert engine.metrics.generated_tokens._value.get() - before < fields["n"] * 480  # stopped, not run to the end
    # The slot is free: the next client is answered.
    assert httpx.post(f"{url}/v1/chat/completions", json=_chat(max_tokens=3), timeout=60).status_code == 200
