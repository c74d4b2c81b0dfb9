"""Tokenize once: first start against restarts on a 100k-sample generated dataset (issue 14
item 4).

The trainer runs the same job (2 ranks under torchrun, the quick test model, prompt/response
chat data skewed short, maxSteps 1) three times:
  first start    nothing cached: tokenized (by one rank per node; before the cache every
                 rank of every start tokenized everything)
  restart        same node: the node's local copy is read
  fresh node     an empty KUBETUNE_CACHE_DIR: the copy beside the checkpoints is fetched
Figures: seconds from launch to the trainer's `start` event (data, model and engine ready),
and the event's `data_seconds` (rank 0's time in the data pipeline: cache key, tokenizing or
reading the cached tokens, packing, planning) and `tokens_from`. The difference
between the first start and a restart is the tokenizing the cache saves. Run it with another trainer first on PYTHONPATH to measure that
one: a trainer without the cache reports no `tokens_from` and tokenizes on every rank at
every start, so only its first start is run.

    python -m bench.tokenize_cache [--samples 100000] [--workdir DIR] [--out FILE]
"""

from __future__ import annotations

import math
import os
import random
import shutil
from pathlib import Path

from bench import standalone
from bench.common import QUICK_SHAPE, BenchError, build_bench_model, job_document, run_trainer, write_job, write_jsonl

SEED = 17


def generated_records(n: int, seed: int) -> list[dict[str, str]]:
    """prompt/response records of pseudo-words, lengths log-normal (median prompt 12 words,
    answer 20), like instruction data; no tokenizer needed, so 100k records take a second."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(500)]

    def text(median: int) -> str:
        return " ".join(rng.choice(words) for _ in range(max(1, min(8 * median, int(rng.lognormvariate(math.log(median), 0.7))))))

    return [{"prompt": text(12), "response": text(20)} for _ in range(n)]


def timed_start(job: Path) -> dict:
    """One run of the job; its node cache (KUBETUNE_CACHE_DIR) is the job file's folder/cache."""
    run = run_trainer(job, nproc=2, timeout=7200).check()
    seconds, start = run.first("start")
    return {"seconds_to_start": round(seconds, 2), "data_seconds": start.get("data_seconds"), "tokens_from": start.get("tokens_from"),
            "train_samples": start["train_samples"], "wall_seconds": round(run.wall_seconds, 2)}  # fmt: skip


def run(workdir: Path, samples: int = 100_000) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = build_bench_model(workdir / "model", QUICK_SHAPE)
    data = write_jsonl(workdir / "chat.jsonl", generated_records(samples, SEED))
    training = {"maxSteps": 1, "microBatchSize": 4, "maxLength": 512, "precision": "fp32", "logEverySteps": 1}
    doc = job_document("tokenize-once", model_dir, data, training=training,
                       distributed={"nodes": 1, "gpusPerNode": 2, "zero": {"stage": 2}},
                       checkpoint={"uri": str(workdir / "checkpoints"), "everySteps": 1000, "keep": 1},
                       output={"uri": str(workdir / "output")})  # fmt: skip
    for folder in ("checkpoints", "output", "node-1", "node-2"):
        shutil.rmtree(workdir / folder, ignore_errors=True)
    node_1, node_2 = write_job(workdir / "node-1" / "job.yaml", doc), write_job(workdir / "node-2" / "job.yaml", doc)
    first = timed_start(node_1)
    figures = {"samples": samples, "data_bytes": data.stat().st_size, "first_start": first}
    if first["tokens_from"] is None:  # a trainer without the cache: every start tokenizes as the first did
        return {**figures, "note": "trainer without a tokenized-data cache: restarts not run", "load_average": os.getloadavg()}
    restart, fresh = timed_start(node_1), timed_start(node_2)
    if not first["train_samples"] == restart["train_samples"] == fresh["train_samples"] == samples:
        raise BenchError(f"the runs trained on different samples: {first}, {restart}, {fresh}")
    (cached,) = (workdir / "checkpoints" / "tokenized").glob("*.npz")
    return {
        **figures,
        "cache_bytes": cached.stat().st_size,
        "restart_same_node": restart,
        "restart_fresh_node": fresh,
        "saved_seconds_restart": round(first["seconds_to_start"] - restart["seconds_to_start"], 2),
        "saved_seconds_fresh_node": round(first["seconds_to_start"] - fresh["seconds_to_start"], 2),
        "data_seconds_ratio_first_over_restart": round(first["data_seconds"] / restart["data_seconds"], 1),
        "load_average": os.getloadavg(),
    }


if __name__ == "__main__":
    standalone.main(__doc__, run, samples=(int, 100_000, "samples in the generated dataset"))
