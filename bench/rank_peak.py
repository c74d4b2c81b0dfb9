"""Run a module as __main__ and record this process's peak memory when it exits.

Used as the program torchrun (or python) starts, in front of the real one:

    torchrun --nproc_per_node 2 bench/rank_peak.py kubetune.train.main --job job.yaml

Each rank writes KUBETUNE_BENCH_PEAK_DIR/rank-<RANK>.json with its peak resident set size
(getrusage, exact, not sampled), its baseline (the RSS when the trainer starts loading the
model: after the imports, the process group, the data and the tokenizer, before any weight
exists), the RSS once the model is loaded, the peak RSS up to the final export (loading,
DeepSpeed, every step and checkpoint: the training's peak) and, where CUDA was used, torch's
peak allocated/reserved GPU memory. The measured program runs unchanged; nothing here
imports torch (the trainer's load_model and save_trained are only wrapped to read the RSS).
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import runpy
import sys
from pathlib import Path

_PHASES: dict[str, int] = {}


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _watch_trainer_phases() -> None:
    """Record the RSS when kubetune's load_model is entered (baseline) and when it returns, and
    the peak so far when the export (save_trained) starts."""
    try:
        from kubetune.model import loader
        from kubetune.train import export
    except ImportError:
        return
    save_trained = export.save_trained

    def measured_save_trained(*args, **kwargs):
        _PHASES.setdefault("pre_export_peak_rss_bytes", peak_rss())
        return save_trained(*args, **kwargs)

    export.save_trained = measured_save_trained
    load_model = loader.load_model

    def measured_load_model(*args, **kwargs):
        _PHASES.setdefault("baseline_rss_bytes", current_rss())
        model = load_model(*args, **kwargs)
        _PHASES.setdefault("loaded_rss_bytes", current_rss())
        return model

    loader.load_model = measured_load_model


def peak_memory() -> dict:
    peak = {"max_rss_bytes": peak_rss(), **_PHASES}
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
    if module == "kubetune.train.main":
        _watch_trainer_phases()
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
