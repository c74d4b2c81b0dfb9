"""`kubetune chat` against a served tiny model: the answers are the server's greedy answers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kubetune.cli.serving import LocalServer


@pytest.fixture(scope="module")
def served_tiny(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with LocalServer(str(tiny_model_dir), log_path=log) as server:
        yield server


def reference_answer(url: str, question: str, max_tokens: int = 12) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=max_tokens)
    return reply.choices[0].message.content


def run_chat(target: str, stdin: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kubetune.cli", "chat", target, "--temperature", "0", "--max-tokens", "12", "--no-history", *extra]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=300)


def test_chat_with_a_served_endpoint(served_tiny):
    questions = ["What is the capital of France?", "Tell me about LoRA."]
    done = run_chat(served_tiny.url, "\n".join(questions) + "\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "".join(reference_answer(served_tiny.url, q) + "\n" for q in questions)


def test_chat_with_a_model_location_serves_it_for_the_session(served_tiny, tiny_model_dir):
    question = "Kubernetes runs containers in"
    done = run_chat(str(tiny_model_dir), question + "\n/exit\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == reference_answer(served_tiny.url, question) + "\n"


def test_chat_reports_an_unreachable_endpoint():
    from kubetune.artifacts.net import free_port

    done = run_chat(f"http://127.0.0.1:{free_port()}", "hello\n")
    assert done.returncode == 1
    assert "kubetune chat: http://127.0.0.1:" in done.stderr
