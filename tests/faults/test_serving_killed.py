"""A serving process (`kubetune-serve`, as the serving pod runs it) is SIGKILLed while clients
stream and wait for greedy answers. Every client gets either its complete, correct answer or
an error; a broken stream holds only a prefix of the correct answer and never a [DONE]: no
client ever receives a wrong or truncated answer presented as complete.

Also here: hostile requests and authentication against the same real process (the in-process
catalogue of the serving engineer is tests/serve/test_server.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from kubetune.artifacts.net import free_port

TOKEN = "kubetune-serve-test-token"
QUESTIONS = ["Hi", "What is the capital of France?", "Explain LoRA in one sentence", "你好", "Kubernetes?", "DeepSpeed ZeRO?"]
MAX_TOKENS = 48

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def start_serve(model_dir, workdir):
    """Start kubetune-serve on the tiny model with a bearer token; yields (url, process)."""
    port = free_port()
    token_file = workdir / "token"
    token_file.write_text(TOKEN + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KUBETUNE_CACHE_DIR": str(workdir / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "kubetune.serve.server", "--model", str(model_dir), "--port", str(port),
                             "--token-file", str(token_file), "--served-model-name", "tiny", "--max-batch", "4"],
                            env=env, stdout=open(workdir / "serve.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, (workdir / "serve.log").read_text()[-3000:]
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    yield url, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def serve(tiny_model_dir, tmp_path_factory):
    yield from start_serve(tiny_model_dir, tmp_path_factory.mktemp("serve"))


@pytest.fixture
def doomed_serve(tiny_model_dir, tmp_path):
    """A server of this test alone: it gets killed."""
    yield from start_serve(tiny_model_dir, tmp_path)


HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def body(question: str, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": question}], "max_tokens": MAX_TOKENS, "temperature": 0, **extra}


def answer(url: str, question: str) -> str:
    response = httpx.post(f"{url}/v1/chat/completions", json=body(question), headers=HEADERS, timeout=120)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def stream(url: str, question: str) -> tuple[str, bool]:
    """(text received, whether the stream ended with [DONE]); raises on a broken connection
    only through the partial result (the text so far, False)."""
    text, done = "", False
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body(question, stream=True), headers=HEADERS, timeout=120) as response:
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    for choice in json.loads(line[6:])["choices"]:
                        text += choice["delta"].get("content") or ""
    except httpx.TransportError:
        pass
    return text, done


def test_killed_under_load_clients_get_the_right_answer_or_an_error(doomed_serve):
    url, proc = doomed_serve
    expected = {q: answer(url, q) for q in QUESTIONS}
    assert all(expected.values())
    results: list[tuple[str, str, object]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        question = QUESTIONS[i % len(QUESTIONS)]
        for round_ in range(50):
            if i % 2:
                outcome = stream(url, question)
            else:
                try:
                    outcome = answer(url, question)
                except (httpx.TransportError, httpx.HTTPStatusError) as err:
                    outcome = err
            with lock:
                results.append((question, "stream" if i % 2 else "plain", outcome))
            if isinstance(outcome, Exception) or (isinstance(outcome, tuple) and not outcome[1]):
                return

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    while len(results) < 8 and proc.poll() is None:  # a few answers done, many in flight
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    for t in threads:
        t.join(timeout=150)

    failed = 0
    for question, kind, outcome in results:
        if isinstance(outcome, Exception):
            failed += 1
        elif kind == "plain":
            assert outcome == expected[question], f"wrong answer for {question!r}"
        else:
            text, done = outcome
            if done:
                assert text == expected[question], f"a complete stream with a wrong answer for {question!r}"
            else:
                failed += 1
                assert expected[question].startswith(text), f"a broken stream with text that is not the answer's start: {text!r}"
    assert failed >= 1 and len(results) - failed >= 8  # the kill hit clients, after some had finished


def error(response: httpx.Response) -> tuple[int, dict]:
    return response.status_code, response.json()


def test_hostile_requests_get_openai_errors(serve):
    url, _ = serve
    chat = f"{url}/v1/chat/completions"
    post = lambda payload, headers=HEADERS: httpx.post(chat, json=payload, headers=headers, timeout=60)  # noqa: E731

    # Authentication: missing, wrong, other schemes, token elsewhere than the header.
    refused = {"error": {"message": "Incorrect or missing API key: send `Authorization: Bearer TOKEN`", "type": "invalid_request_error",
                         "param": None, "code": "invalid_api_key"}}  # fmt: skip
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN},
                    {"Authorization": "Bearer"}, {"X-Api-Key": TOKEN}):  # fmt: skip
        assert error(post(body("Hi"), headers)) == (401, refused), headers
    assert error(httpx.get(f"{url}/v1/models?api_key={TOKEN}")) == (401, refused)
    assert httpx.get(f"{url}/v1/models", headers=HEADERS).status_code == 200

    # And it still answers.
    assert post(body("Hi")).status_code == 200


HI = [{"role": "user", "content": "Hi"}]
# Malformed bodies: an OpenAI error object naming the parameter, never a 500 or a generation.
MALFORMED = [
    ({"model": "tiny"}, "messages", "messages: field required"),
    ({"model": "tiny", "messages": "Hi"}, "messages", "messages: Input should be a valid list"),
    ({"model": "tiny", "messages": []}, "messages", "messages: List should have at least 1 item after validation, not 0"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, "messages.0.content", "messages.0.content: Input should be a valid string"),
    ({"model": "tiny", "messages": HI, "max_tokens": "many"}, "max_tokens", "max_tokens: Input should be a valid integer"),  # JSON types as documented: no "5" for 5
    ({"model": "tiny", "messages": HI, "top_p": 2}, "top_p", "top_p: Input should be less than or equal to 1"),
    ({"model": "tiny", "messages": HI, "n": 10**9}, "n", "n: Input should be less than or equal to 128"),
    ({"model": "tiny", "messages": HI, "stop": 5}, "stop", "stop: Input should be a valid list"),
    ({"model": ["tiny"], "messages": HI}, "model", "model: Input should be a valid string"),
]


def test_malformed_requests_get_exact_openai_errors(serve):
    url, _ = serve
    for payload, param, message in MALFORMED:
        response = httpx.post(f"{url}/v1/chat/completions", json=payload, headers=HEADERS, timeout=60)
        expected = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
        assert error(response) == (400, expected), payload


def test_message_without_content_is_refused(serve):
    url, _ = serve
    response = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user"}]}, headers=HEADERS, timeout=60)
    assert error(response) == (
        400,
        {"error": {"message": "messages.0.content: field required", "type": "invalid_request_error", "param": "messages.0.content", "code": None}},
    )
