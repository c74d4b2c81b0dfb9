"""Run a module as __main__ and record this process's peak memory when it exits.

Used as the program torchrun (or python) starts, in front of the real one:

    torchrun --nproc_per_node 2 bench/rank_peak.py kubetune.train.main --job job.yaml

Each rank writes KUBETUNE_BENCH_PEAK_DIR/rank-<RANK>.json with its peak resident set size
(getrusage, exact, not sampled) and, where CUDA was used, torch's peak allocated/reserved
GPU memory. The measured program runs unchanged; nothing here imports torch.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import runpy
import sys
from pathlib import Path


def peak_memory() -> dict:
    peak = {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux reports KiB
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        peak["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return peak


def _record() -> None:
    out = os.environ.get("KUBETUNE_BENCH_PEAK_DIR")
    if not out:
        return
    rank = int(os.environ.get("RANK", "0"))
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, **peak_memory()}))


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: rank_peak.py MODULE [ARGS...]")
    module = sys.argv[1]
    sys.argv = [module] + sys.argv[2:]
    atexit.register(_record)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
