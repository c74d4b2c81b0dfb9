"""What every benchmark shares: the machine description, the benchmark model and data,
job files, running the real trainer with per-rank peak memory, and the equal-work check.

A benchmark module exposes `run(workdir: Path, quick: bool = False) -> dict`. Its dict holds
its figures, an `equal_work` block (see `equal_work`) and, where there is a baseline, `ratio`
(KubeTune over baseline, >1 means KubeTune is better), which is None unless the work was equal.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
RANK_PEAK = BENCH_DIR / "rank_peak.py"

# Bigger than the test model so compute, not Python overhead, dominates a step.
THROUGHPUT_SHAPE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
# ~85M parameters: model states (16 bytes per parameter with Adam in fp32) dominate the framework.
MEMORY_SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=512)
# ~155M parameters for the ZeRO memory benchmark: DDP's model states (16 bytes per parameter,
# fp32 Adam) are ~2.3 GiB per rank, several times the ~0.4 GiB process baseline, and two DDP
# ranks stay under 8 GiB together.
ZERO_MEMORY_SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512)
QUICK_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)


def bench_env(threads: int, **extra: str) -> dict[str, str]:
    """Environment for a measured subprocess: fixed thread count, offline, cached JIT ops."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        KUBETUNE_METRICS_PORT="0",
        PYTHONUNBUFFERED="1",
    )
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------
# The machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a missing optional package is reported as None
        return None


def machine() -> dict[str, Any]:
    """What the figures were measured on, including how busy the machine was."""
    import psutil

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "load_average_1m_5m_15m": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "deepspeed": _version("deepspeed"),
    }


# ---------------------------------------------------------------------------------------
# Model and data


def build_bench_model(dest: Path, shape: dict[str, int], seed: int = 0) -> Path:
    """A Llama model of the given shape with the tiny ChatML tokenizer (built offline, cached)."""
    from kubetune.testing import build_tiny_model

    if (dest / "config.json").exists():
        return dest
    return build_tiny_model(dest, seed=seed, **shape)


def model_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())


_WORDS = (
    "the model adapts a pretrained language task data cluster node pod train step loss "
    "answer question capital france paris fox dog quick brown lazy jumps kubernetes "
    "deepspeed zero partitions optimizer states gradients parameters lora adapters rank"
).split()


def chat_records(n: int, min_tokens: int, max_tokens: int, seed: int, tokenizer) -> list[dict[str, str]]:
    """prompt/response records whose chat-formatted length lies in [min, max] tokens, skewed
    short (log-normal, median max/5) like real instruction data. No record exceeds max_tokens,
    so no trainer has to truncate and every run sees exactly the same tokens."""
    rng = random.Random(seed)
    overhead = len(_chat_ids(tokenizer, "a", "a")) - 2
    records = []
    for _ in range(n):
        target = min(max_tokens, max(min_tokens, int(rng.lognormvariate(math.log(max_tokens / 5), 0.8))))
        budget = max(2, target - overhead)
        prompt_tokens = max(1, int(budget * rng.uniform(0.2, 0.6)))
        prompt = _text_of(tokenizer, rng, prompt_tokens)
        response = _text_of(tokenizer, rng, max(1, budget - prompt_tokens))
        while len(_chat_ids(tokenizer, prompt, response)) > max_tokens:
            response = response.rsplit(" ", 1)[0] if " " in response else "ok"
        records.append({"prompt": prompt, "response": response})
    return records


def _text_of(tokenizer, rng: random.Random, tokens: int) -> str:
    words: list[str] = []
    while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < tokens:
        words.append(rng.choice(_WORDS))
    return " ".join(words)


def chat_messages(prompt: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _chat_ids(tokenizer, prompt: str, response: str) -> list[int]:
    return list(tokenizer.apply_chat_template(chat_messages(prompt, response), tokenize=True, return_dict=True)["input_ids"])


def tokenize_chat(tokenizer, record: dict[str, str]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one record: labels are -100 on the prompt (loss on the answer only)."""
    ids = _chat_ids(tokenizer, record["prompt"], record["response"])
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": record["prompt"]}], tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    labels = [-100] * len(prompt) + ids[len(prompt) :]
    return ids, labels


def write_jsonl(path: Path, records: Iterable[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


# ---------------------------------------------------------------------------------------
# Jobs and trainer runs


def job_document(name: str, model_dir: Path, data: Path, *, training: dict, method: Optional[dict] = None, distributed: Optional[dict] = None, **spec: Any) -> dict:
    """A FineTuneJob document (user-facing names), validated with the real spec model."""
    from kubetune.api.spec import parse_job

    doc = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": str(model_dir)},
            "dataset": {"uri": str(data), "format": "prompt_response", "shuffle": False},
            "method": method or {"type": "full"},
            "training": training,
            "distributed": distributed or {"nodes": 1, "gpusPerNode": 1, "zero": {"stage": 0}},
            **spec,
        },
    }
    parse_job(doc, name)
    return doc


def write_job(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@dataclass
class TrainerRun:
    """One run of `kubetune-train`: its JSON events with arrival times (seconds since start)."""

    returncode: int
    wall_seconds: float
    events: list[tuple[float, dict]]
    stderr_tail: str
    rank_peaks: dict[int, dict] = field(default_factory=dict)  # exact, whole process life (rank_peak.py)
    rss_samples: list[tuple[float, int, int]] = field(default_factory=list)  # (seconds, rank, rss bytes)

    def peak_rss_between(self, start: float, end: float) -> dict[int, int]:
        """Highest sampled RSS of each rank between two event times (e.g. the training phase)."""
        peaks: dict[int, int] = {}
        for t, rank, rss in self.rss_samples:
            if start <= t <= end:
                peaks[rank] = max(peaks.get(rank, 0), rss)
        return peaks

    def of(self, kind: str) -> list[tuple[float, dict]]:
        return [(t, e) for t, e in self.events if e.get("event") == kind]

    def first(self, kind: str) -> tuple[float, dict]:
        found = self.of(kind)
        if not found:
            raise BenchError(f"the trainer printed no {kind!r} event (exit {self.returncode}):\n{self.stderr_tail}")
        return found[0]

    def last(self, kind: str) -> tuple[float, dict]:
        found = self.of(kind)
        if not found:
            raise BenchError(f"the trainer printed no {kind!r} event (exit {self.returncode}):\n{self.stderr_tail}")
        return found[-1]

    def check(self) -> "TrainerRun":
        if self.returncode != 0:
            raise BenchError(f"kubetune-train exited with {self.returncode}:\n{self.stderr_tail}")
        return self


class BenchError(RuntimeError):
    pass


def trainer_command(job: Path, nproc: int, extra: Iterable[str] = (), master_port: Optional[int] = None) -> list[str]:
    """`kubetune-train --job JOB` (alone or under torchrun), wrapped to record each rank's peak memory."""
    program = [str(RANK_PEAK), "kubetune.train.main", "--job", str(job), *extra]
    if nproc == 1:
        return [sys.executable, *program]
    from kubetune.artifacts.net import free_port

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(master_port or free_port())]
    return [*torchrun, *program]


def run_trainer(job: Path, *, nproc: int = 1, threads: int = 2, env: Optional[dict] = None, timeout: float = 900, extra: Iterable[str] = (), stop_after_first_step: bool = False,
                wrapper: Iterable[str] = ()) -> TrainerRun:
    """Run the trainer on a job file and collect its events. With stop_after_first_step it is
    sent SIGTERM (a preemption) when its first step event arrives. `wrapper` prefixes the
    command (a profiler: `py-spy record ... --`)."""
    run_dir = job.parent / f"run-{time.monotonic_ns()}"
    peak_dir = run_dir / "peaks"
    # A fresh checkpoint staging folder per run: a resume downloads, as on a new node.
    full_env = bench_env(threads, KUBETUNE_BENCH_PEAK_DIR=str(peak_dir), KUBETUNE_CACHE_DIR=str(job.parent / "cache"),
                         KUBETUNE_CHECKPOINT_LOCAL_DIR=str(run_dir / "checkpoint-staging"), **(env or {}))  # fmt: skip
    events: list[tuple[float, dict]] = []
    stderr_lines: list[str] = []
    start = time.monotonic()
    proc = subprocess.Popen([*wrapper, *trainer_command(job, nproc, extra)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=job.parent, start_new_session=True)

    def drain_stderr() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            stderr_lines.append(line)
            del stderr_lines[:-60]

    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()

    def sample_rss() -> None:
        import psutil

        # Alone, the process is rank 0; under torchrun the ranks are torchrun's direct children.
        ranks: dict[int, int] = {}
        while not stop.wait(0.2):
            try:
                root = psutil.Process(proc.pid)
                procs = [root] if nproc == 1 else root.children()
            except psutil.NoSuchProcess:
                return
            now = time.monotonic() - start
            for p in procs:
                try:
                    if p.pid not in ranks:
                        ranks[p.pid] = int(p.environ().get("RANK", "0"))
                    samples.append((now, ranks[p.pid], p.memory_info().rss))
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue

    reader = threading.Thread(target=drain_stderr, daemon=True)
    reader.start()
    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, 9))
    timer.start()
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            now = time.monotonic() - start
            line = line.strip()
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                events.append((now, event))
                if stop_after_first_step and event.get("event") == "step" and sum(e.get("event") == "step" for _, e in events) == 1:
                    proc.send_signal(signal.SIGTERM)
        returncode = proc.wait()
    finally:
        timer.cancel()
        stop.set()
    wall = time.monotonic() - start
    reader.join(timeout=5)
    sampler.join(timeout=5)
    peaks = {}
    if peak_dir.is_dir():
        for f in sorted(peak_dir.glob("rank-*.json")):
            record = json.loads(f.read_text())
            peaks[record["rank"]] = record
    return TrainerRun(returncode, wall, events, "".join(stderr_lines), peaks, samples)


# ---------------------------------------------------------------------------------------
# Equal work and ratios


def same(kubetune: Any, baseline: Any, tolerance: float = 0.0) -> dict[str, Any]:
    """One equal-work check: equal values, or numbers within a relative tolerance."""
    if tolerance and isinstance(kubetune, (int, float)) and isinstance(baseline, (int, float)) and baseline:
        ok = abs(kubetune - baseline) / abs(baseline) <= tolerance
    else:
        ok = kubetune == baseline
    check = {"kubetune": kubetune, "baseline": baseline, "equal": bool(ok)}
    if tolerance:
        check["tolerance"] = tolerance
    return check


def equal_work(**checks: dict[str, Any]) -> dict[str, Any]:
    """The record of a benchmark's equal-work checks; `ok` only if every one holds."""
    return {"ok": all(c["equal"] for c in checks.values()), "checks": checks}


def ratio(kubetune: float, baseline: float, work: dict[str, Any], higher_is_better: bool = True) -> Optional[float]:
    """KubeTune over baseline (>1 better), or None when the work was not equal."""
    if not work["ok"] or not kubetune or not baseline:
        return None
    value = kubetune / baseline if higher_is_better else baseline / kubetune
    return round(value, 3)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


def rounded(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value
