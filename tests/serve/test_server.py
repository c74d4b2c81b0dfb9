"""The HTTP server through the official `openai` client: chat (plain and streamed),
completions, models, errors, auth, many clients at once, the bounded queue and readiness."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serve_helpers import chat_ids, openai_client, reference_ids

from kubetune.api.spec import GenerationSpec
from kubetune.serve.server import ServeSettings

QUESTIONS = [
    "Hi",
    "What is the capital of France?",
    "Explain LoRA in one sentence, please, with details about the rank",
    "你好",
    "Kubernetes?",
    "Tell me about DeepSpeed ZeRO partitions of optimizer states and gradients",
]


def _expected(tiny, engine, messages, max_tokens, **kwargs) -> str:
    ids = reference_ids(tiny.model, chat_ids(tiny.tokenizer, messages), max_tokens, engine.eos_ids, **kwargs)
    return tiny.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture
def server(start_server):
    url, engine = start_server(ServeSettings("tiny", GenerationSpec(max_tokens=20)), max_batch=8)
    return url, engine, openai_client(url)


def test_chat_greedy_equals_generate_plain_and_streamed(server, tiny):
    url, engine, client = server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTIONS[1]}]
    expected = _expected(tiny, engine, messages, 24)
    answer = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=24)
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage.prompt_tokens == len(chat_ids(tiny.tokenizer, messages))
    assert answer.usage.completion_tokens == 24 and answer.choices[0].finish_reason == "length"

    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, temperature=0, max_tokens=24, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 24
    assert len({c.id for c in chunks}) == 1


def test_stream_is_server_sent_events_ending_with_done(server):
    url, _, _ = server
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 5}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_generation_settings_and_defaults(server, tiny):
    url, engine, client = server
    messages = [{"role": "user", "content": QUESTIONS[2]}]
    # Extra fields beyond the OpenAI API reach the model.
    answer = client.chat.completions.create(
        model="tiny", messages=messages, temperature=0, max_tokens=20, extra_body={"repetition_penalty": 1.5, "no_repeat_ngram_size": 2}
    )
    assert answer.choices[0].message.content == _expected(tiny, engine, messages, 20, repetition_penalty=1.5, no_repeat_ngram_size=2)
    beams = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=10, n=2, extra_body={"num_beams": 3})
    assert beams.choices[0].message.content == _expected(tiny, engine, messages, 10, num_beams=3)
    # Without max_tokens the server default (GenerationSpec maxTokens=20) applies.
    default = client.chat.completions.create(model="tiny", messages=messages, temperature=0)
    assert default.usage.completion_tokens == 20
    # Seeded sampling with n choices: distinct samples, each reported with its index.
    sampled = client.chat.completions.create(model="tiny", messages=messages, temperature=1.0, top_p=0.95, seed=3, n=3, max_tokens=12)
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert len({c.message.content for c in sampled.choices}) == 3
    # A stop string ends the answer and is not part of it.
    full = _expected(tiny, engine, messages, 20)
    stop = full[5:8]
    stopped = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=20, stop=[stop])
    assert stopped.choices[0].message.content == full[: full.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_completions_and_models(server, tiny):
    url, engine, client = server
    prompts = ["The quick brown fox", "Fine-tuning adapts"]
    answer = client.completions.create(model="tiny", prompt=prompts, max_tokens=10, temperature=0)
    for choice, prompt in zip(answer.choices, prompts):
        ids = tiny.tokenizer(prompt)["input_ids"]
        assert choice.text == tiny.tokenizer.decode(reference_ids(tiny.model, ids, 10, engine.eos_ids), skip_special_tokens=True)
    assert [c.index for c in answer.choices] == [0, 1]
    streamed = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == answer.choices[0].text
    as_ids = client.completions.create(model="tiny", prompt=tiny.tokenizer(prompts[0])["input_ids"], max_tokens=10, temperature=0)
    assert as_ids.choices[0].text == answer.choices[0].text
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=[1, 10**6], max_tokens=3)
    assert err.value.body["param"] == "prompt"
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    url, engine, client = server
    hi = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4", messages=hi)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=hi, max_tokens=-3)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 600}])
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=hi, max_tokens=engine.context_length)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=hi, temperature="hot")  # type: ignore[arg-type]
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    assert err.value.body["param"].startswith("messages")
    for raw in (b'{"model": "tiny", "messages": [', b"[1, 2]", b"\xff\xfe"):
        response = httpx.post(f"{url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    answer = client.chat.completions.create(model="tiny", messages=hi, max_tokens=3)
    assert answer.choices[0].finish_reason in ("length", "stop")
    metrics = httpx.get(f"{url}/metrics").text
    assert 'kubetune_serve_errors_total{endpoint="/v1/chat/completions",type="invalid_request_error"}' in metrics
    assert 'kubetune_serve_requests_total{endpoint="/v1/chat/completions",status="400"}' in metrics


def test_many_clients_each_get_their_own_answer(server, tiny):
    url, engine, client = server
    jobs = [(q, 8 + 4 * i, i % 2 == 0) for i, q in enumerate(QUESTIONS * 2)]

    def ask(job):
        question, max_tokens, stream = job
        messages = [{"role": "user", "content": question}]
        if stream:
            chunks = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=max_tokens, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=max_tokens).choices[0].message.content

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    for (question, max_tokens, _), answer in zip(jobs, answers):
        assert answer == _expected(tiny, engine, [{"role": "user", "content": question}], max_tokens)
    metrics = httpx.get(f"{url}/metrics").text
    for name in (
        "kubetune_serve_request_latency_seconds_bucket", "kubetune_serve_time_to_first_token_seconds_bucket",
        "kubetune_serve_generated_tokens_total", "kubetune_serve_tokens_per_second", "kubetune_serve_queue_depth",
        "kubetune_serve_batch_size_bucket",
    ):  # fmt: skip
        assert name in metrics


def test_full_queue_answers_429_and_readiness_waits_for_the_warmup(start_server, tiny):
    url, engine = start_server(max_batch=2, max_queue=2, start_engine=False)
    client = openai_client(url)
    assert httpx.get(f"{url}/healthz").status_code == 200
    assert httpx.get(f"{url}/readyz").status_code == 503
    hi = [{"role": "user", "content": "Hi"}]
    results: list = []
    waiting = [
        threading.Thread(target=lambda: results.append(client.chat.completions.create(model="tiny", messages=hi, max_tokens=4, temperature=0)))
        for _ in range(2)
    ]
    for thread in waiting:
        thread.start()
    deadline = time.monotonic() + 60
    while engine.queue_depth < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.queue_depth == 2
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="tiny", messages=hi, max_tokens=4)
    assert err.value.response.headers["retry-after"] == "1"
    assert err.value.body["code"] == "queue_full"
    engine.start()
    for thread in waiting:
        thread.join(timeout=60)
    assert httpx.get(f"{url}/readyz").status_code == 200
    assert [r.choices[0].message.content for r in results] == [_expected(tiny, engine, hi, 4)] * 2


def test_bearer_token_and_no_history(start_server, tiny):
    url, engine = start_server(ServeSettings("qa", GenerationSpec(temperature=0, max_tokens=12), history=False, token="s3cret"))
    with pytest.raises(openai.AuthenticationError):
        openai_client(url).models.list()
    with pytest.raises(openai.AuthenticationError):
        openai_client(url, api_key="wrong").models.list()
    for probe in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{url}{probe}").status_code == 200
    client = openai_client(url, api_key="s3cret")
    conversation = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": QUESTIONS[1]},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": QUESTIONS[4]},
    ]
    answer = client.chat.completions.create(model="qa", messages=conversation)  # defaults: greedy, 12 tokens
    alone = [conversation[0], conversation[3]]
    assert answer.choices[0].message.content == _expected(tiny, engine, alone, 12)
    assert answer.usage.prompt_tokens == len(chat_ids(tiny.tokenizer, alone))


def test_a_client_that_leaves_frees_its_place_in_the_batch(server):
    url, engine, _ = server
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 480, "ignore_eos": True}
    before = engine.metrics.generated_tokens._value.get()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break  # generation has started
        assert engine.running == 1
    deadline = time.monotonic() + 60
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running == 0
    assert engine.metrics.generated_tokens._value.get() - before < 480  # stopped early, not run to its end
