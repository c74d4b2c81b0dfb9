"""Serving throughput: `kubetune-serve` (dynamic batching) against `model.generate` in a loop.

    python -m bench.serve_bench [--model DIR|FILE.gguf] [--clients 1,4,16] [--max-tokens 64]

The server runs as the real command in its own process (`python -m kubetune.serve.server`);
C client threads here each send chat requests one after another over HTTP. The baseline
answers the same requests one at a time with `model.generate` (greedy) in this process, with
the same thread count. Both sides generate exactly `max_tokens` per request (the server with
`ignore_eos`, the baseline with `min_new_tokens`), and the generated token counts are
compared (equal work) before any ratio is given. Baseline latency is the time per request
alone, without queueing behind other clients. Torch uses `threads` threads on both sides
(default 1: on a 2-core machine the other core runs HTTP and the clients; more threads than
free cores makes OpenMP spin and both sides slow down erratically).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

from bench.common import bench_env, equal_work, percentile, ratio, rounded

QUESTIONS = [
    "Hi",
    "What is the capital of France?",
    "Explain LoRA in one sentence.",
    "How do pods get scheduled on nodes in Kubernetes, and what decides the node?",
    "你好，今天天气很好吗？",
    "Summarise what DeepSpeed ZeRO partitions: optimizer states, gradients and parameters, and why that saves memory on each GPU.",
    "List three fine-tuning methods.",
    "Why does a wrong chat template make a tuned model never stop generating?",
]


def _requests(count: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(count)]


def _start_server(model: str, port: int, max_batch: int, threads: int, cache_dir: Path, log) -> subprocess.Popen:
    args = [sys.executable, "-m", "kubetune.serve.server", "--model", model, "--port", str(port), "--max-batch", str(max_batch),
            "--max-queue", "1024", "--served-model-name", "bench", "--cache-dir", str(cache_dir), "--log-level", "warning"]  # fmt: skip
    env = bench_env(threads)
    env.pop("KUBETUNE_SERVE_TOKEN", None)
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kubetune-serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"kubetune-serve was not ready after {timeout}s")


def _serve_level(url: str, clients: int, requests: list, max_tokens: int) -> dict[str, Any]:
    """C client threads share the request list; each sends its next request when the last one is answered."""
    import httpx

    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    work = list(enumerate(requests))
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if not work:
                        return
                    _, messages = work.pop(0)
                body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
                start = time.perf_counter()
                response = http.post(f"{url}/v1/chat/completions", json=body)
                elapsed = time.perf_counter() - start
                with lock:
                    if response.status_code != 200:
                        errors.append(response.text[:300])
                        continue
                    latencies.append(elapsed)
                    tokens[0] += response.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    return {"seconds": wall, "generated_tokens": tokens[0], "latencies": latencies}


def _baseline_level(model, tokenizer, requests: list, max_tokens: int) -> dict[str, Any]:
    import torch

    latencies, tokens = [], 0
    start = time.perf_counter()
    for messages in requests:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        begin = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        latencies.append(time.perf_counter() - begin)
        tokens += out.shape[1] - ids.shape[1]
    return {"seconds": time.perf_counter() - start, "generated_tokens": tokens, "latencies": latencies}


def run(
    model_dir: str | Path,
    clients: tuple[int, ...] = (1, 4, 16),
    quick: bool = False,
    max_tokens: Optional[int] = None,
    threads: Optional[int] = None,
    requests_per_level: Optional[int] = None,
) -> dict[str, Any]:
    """Measure tokens/s and latency p50/p99 of the server at each client count and of the baseline."""
    import torch

    from kubetune.artifacts.net import free_port
    from kubetune.serve.loader import load_model

    max_tokens = max_tokens or (16 if quick else 64)
    threads = threads or 1
    torch.set_num_threads(threads)
    workdir = Path(tempfile.mkdtemp(prefix="kubetune-serve-bench-"))
    loaded = load_model(str(model_dir), cache_dir=workdir / "cache")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "serve.log"
    log = open(log_path, "wb")
    proc = _start_server(str(model_dir), port, max(clients), threads, workdir / "cache", log)
    levels: dict[str, Any] = {}
    checks: dict[str, Any] = {}
    try:
        _wait_ready(url, proc, log_path)
        _serve_level(url, 1, _requests(2), max_tokens)  # warm the HTTP path
        _baseline_level(loaded.model, loaded.tokenizer, _requests(2), max_tokens)
        for count in clients:
            requests = _requests(requests_per_level or max(2 * count, 4 if quick else 8))
            served = _serve_level(url, count, requests, max_tokens)
            base = _baseline_level(loaded.model, loaded.tokenizer, requests, max_tokens)
            work = equal_work(tokens={"kubetune": served["generated_tokens"], "baseline": base["generated_tokens"],
                                      "equal": served["generated_tokens"] == base["generated_tokens"]})  # fmt: skip
            checks[f"generated_tokens_{count}_clients"] = work["checks"]["tokens"]
            ours = served["generated_tokens"] / served["seconds"]
            theirs = base["generated_tokens"] / base["seconds"]
            levels[str(count)] = {
                "requests": len(requests),
                "generated_tokens": served["generated_tokens"],
                "kubetune_tokens_per_second": ours,
                "baseline_tokens_per_second": theirs,
                "ratio": ratio(ours, theirs, work),
                "kubetune_latency_p50_seconds": percentile(served["latencies"], 50),
                "kubetune_latency_p99_seconds": percentile(served["latencies"], 99),
                "baseline_latency_p50_seconds": percentile(base["latencies"], 50),
                "baseline_latency_p99_seconds": percentile(base["latencies"], 99),
            }
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    result = {
        "model": str(model_dir),
        "max_tokens": max_tokens,
        "threads": threads,
        "max_batch": max(clients),
        "clients": levels,
        "equal_work": {"ok": all(c["equal"] for c in checks.values()), "checks": checks},
        "ratio": levels[str(max(clients))]["ratio"],
    }
    _print_table(result)
    return rounded(result)


def _print_table(result: dict[str, Any]) -> None:
    print(f"serving, {result['max_tokens']} tokens per request, {result['threads']} threads, model {result['model']}")
    print("| clients | kubetune tok/s | generate tok/s | ratio | kubetune p50 / p99 (s) | generate p50 / p99 (s) |")
    print("|---|---|---|---|---|---|")
    for count, f in result["clients"].items():
        print(
            f"| {count} | {f['kubetune_tokens_per_second']:.1f} | {f['baseline_tokens_per_second']:.1f} | {f['ratio']} "
            f"| {f['kubetune_latency_p50_seconds']:.3f} / {f['kubetune_latency_p99_seconds']:.3f} "
            f"| {f['baseline_latency_p50_seconds']:.3f} / {f['baseline_latency_p99_seconds']:.3f} |"
        )


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Model folder or .gguf file (default: the benchmark model, built offline).")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    model = args.model
    if model is None:
        from bench.common import THROUGHPUT_SHAPE, build_bench_model

        model = build_bench_model(Path(tempfile.mkdtemp(prefix="kubetune-bench-model-")), THROUGHPUT_SHAPE)
    result = run(model, tuple(int(c) for c in args.clients.split(",")), quick=args.quick, max_tokens=args.max_tokens, threads=args.threads)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
