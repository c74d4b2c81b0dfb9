"""Run the CPU benchmarks, print a markdown table, write bench/results/cpu.json and cpu.md.

    python -m bench.run_cpu                  # the full set (`make bench`), a few minutes
    python -m bench.run_cpu --quick --out DIR   # tiny sizes, to check that everything runs
    python -m bench.run_cpu --only trainer_throughput,operator_scale

cpu.json: `machine` (CPU, cores, memory, load, versions, date), then one key per benchmark
holding its figures, its `equal_work` checks and, where there is a baseline, `ratio`
(KubeTune over baseline, >1 means KubeTune is better; None when the work was not equal),
and `goal` (the target and whether it was met). A benchmark that fails records `error`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from bench.common import RESULTS_DIR, machine, rounded

MiB = 1024 * 1024


def _serving(workdir: Path, quick: bool) -> dict:
    from bench import serve_bench
    from bench.common import QUICK_SHAPE, THROUGHPUT_SHAPE, build_bench_model

    model_dir = build_bench_model(workdir / "model", QUICK_SHAPE if quick else THROUGHPUT_SHAPE)
    return serve_bench.run(model_dir, clients=(1, 2) if quick else (1, 4, 16), quick=quick)


def _module_run(name: str) -> Callable[[Path, bool], dict]:
    def run(workdir: Path, quick: bool) -> dict:
        module = __import__(f"bench.{name}", fromlist=["run"])
        return module.run(workdir, quick=quick)

    return run


def _trainer_vs_peer(workdir: Path, quick: bool) -> dict:
    from bench import trainer_throughput

    return trainer_throughput.run_peer(workdir, quick=quick, profile=not quick)  # where the time goes, on the real sizes


BENCHMARKS: dict[str, Callable[[Path, bool], dict]] = {
    "trainer_throughput": _module_run("trainer_throughput"),
    "trainer_vs_peer": _trainer_vs_peer,
    "zero_memory": _module_run("zero_memory"),
    "checkpoint_cost": _module_run("checkpoint_cost"),
    "operator_scale": _module_run("operator_scale"),
    "serving": _serving,
}


# ---------------------------------------------------------------------------------------
# Goals (issue 8) and the table


def _get(result: dict, *path: str) -> Any:
    for key in path:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


def goal(name: str, result: dict) -> Optional[dict]:
    """The issue's target for a benchmark and whether this run met it."""
    r = result.get("ratio")
    if name == "trainer_throughput":
        return {"target": "effective tokens/s >= 2.5x the HF Trainer baseline", "met": r is not None and r >= 2.5}
    if name == "trainer_vs_peer":
        return {"target": "effective tokens/s >= 1.2x the best padding-free peer (HF Trainer + DataCollatorWithFlattening, TRL SFTTrainer BFD packing), equal loss",
                "met": r is not None and r >= 1.2 and bool(result.get("loss_equal"))}  # fmt: skip
    if name == "zero_memory":
        z = result.get("zero3_over_ddp")
        return {"target": "ZeRO-3 training memory per rank (above the process baseline) <= 0.6x DDP", "met": bool(result["equal_work"]["ok"]) and z is not None and z <= 0.6}
    if name == "checkpoint_cost":
        share, blocked = result.get("share_of_step_time"), result.get("blocked_ratio")
        return {"target": "training blocked by a save >= 2x shorter than torch.save + PUT per file; < 5% of step time at everySteps 100",
                "met": blocked is not None and blocked >= 2 and share is not None and share < 0.05}  # fmt: skip
    if name == "operator_scale":
        p99 = _get(result, "operator", "p99_seconds")
        return {"target": "within 2x of raw creates (ratio >= 0.5), p99 < 5 s", "met": r is not None and r >= 0.5 and p99 is not None and p99 < 5}
    if name == "serving":
        return {"target": ">= 3x plain model.generate tokens/s at 16 clients", "met": r is not None and r >= 3}
    return None


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        text = f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    else:
        text = str(value)
    return f"{text}{unit}"


def _mib(value: Optional[float]) -> Optional[float]:
    return None if value is None else value / MiB


def rows(name: str, result: dict) -> list[tuple[str, str, str, str]]:
    """(figure, KubeTune, baseline, ratio) rows of one benchmark."""
    if "error" in result:
        return [("error", result["error"].splitlines()[-1][:120] if result["error"] else "failed", "", "")]
    g = _get
    if name == "trainer_throughput":
        dyn = result.get("kubetune_dynamic_padding", {})
        return [
            ("effective tokens/s, packing vs padded HF Trainer", _fmt(result.get("kubetune_tokens_per_second")), _fmt(result.get("baseline_tokens_per_second")), _fmt(result.get("ratio"), "x")),
            ("effective tokens/s, dynamic padding (same steps)", _fmt(dyn.get("kubetune_tokens_per_second")), _fmt(dyn.get("baseline_tokens_per_second")), _fmt(dyn.get("ratio"), "x")),
            ("final / mean train loss, packing", f"{_fmt(g(result, 'kubetune_packed', 'final_loss'))} / {_fmt(g(result, 'kubetune_packed', 'mean_loss'))}", f"{_fmt(g(result, 'baseline', 'final_loss'))} / {_fmt(g(result, 'baseline', 'mean_loss'))}", ""),
            ("final / mean train loss, dynamic padding", f"{_fmt(dyn.get('final_loss'))} / {_fmt(dyn.get('mean_loss'))}", "", ""),
        ]
    if name == "trainer_vs_peer":
        k = result.get("kubetune", {})
        out = []
        best = result.get("best_peer")
        # The fastest peer first: its ratio is the goal's figure.
        for peer, figures in sorted((result.get("peers") or {}).items(), key=lambda item: item[0] != best):
            if "error" in figures:
                out.append((f"effective tokens/s vs {peer}", "error", figures["error"].splitlines()[-1][:80], ""))
                continue
            fastest = " (fastest peer)" if peer == best else ""
            out.append((f"effective tokens/s vs {peer}{fastest} ({figures.get('steps')} steps)", _fmt(figures.get("kubetune_tokens_per_second")),
                        _fmt(figures.get("baseline_tokens_per_second")), _fmt(figures.get("ratio"), "x")))  # fmt: skip
            out.append((f"mean / final train loss vs {peer}", f"{_fmt(k.get('mean_loss'))} / {_fmt(k.get('final_loss'))}",
                        f"{_fmt(figures.get('mean_loss'))} / {_fmt(figures.get('final_loss'))}", "equal" if g(figures, "loss", "equal") else "differs"))  # fmt: skip
        return out
    if name == "zero_memory":
        out = []
        for config, run in (result.get("runs") or {}).items():
            if "error" in run:
                out.append((f"peak RSS per rank, {config}", "error", "", ""))
                continue
            measured = f"{_fmt(_mib(run.get('above_baseline_bytes')))} (peak RSS {_fmt(_mib(run.get('peak_rss_bytes')))})"
            out.append((f"memory per rank above the process baseline, {config} (MiB)", measured, f"planner, peak RSS {_fmt(_mib(g(run, 'planner', 'cpu_rank_bytes')))}", ""))
        both = f"{_fmt(result.get('zero3_over_ddp'))} (whole-process peak RSS {_fmt(result.get('zero3_over_ddp_total_rss'))})"
        out.append(("ZeRO-3 over DDP per rank, above baseline", both, "DDP = 1", _fmt(result.get("ratio"), "x")))
        return out
    if name == "checkpoint_cost":
        naive = _fmt(result.get("naive_save_seconds"))
        return [
            ("training blocked by a save (s)", _fmt(result.get("kubetune_blocked_seconds")), naive, _fmt(result.get("blocked_ratio"), "x")),
            ("save until committed, background, training on (s)", _fmt(result.get("kubetune_commit_seconds")), naive, _fmt(result.get("commit_ratio"), "x")),
            ("save until committed, nothing else running (s)", _fmt(result.get("kubetune_save_seconds")), naive, _fmt(result.get("ratio"), "x")),
            ("download + restore (s)", _fmt(result.get("kubetune_load_seconds")), _fmt(result.get("naive_load_seconds")), _fmt(result.get("load_ratio"), "x")),
            ("share of step time at everySteps 100 (blocked + upload slowdown)", _fmt(100 * result["share_of_step_time"], "%") if result.get("share_of_step_time") is not None else "-", "", ""),
            ("process start to first step: resume vs fresh (s)", _fmt(g(result, "resume", "resume_to_first_new_step_seconds")), _fmt(g(result, "resume", "fresh_start_to_first_step_seconds")), ""),
        ]
    if name == "operator_scale":
        op, floor = result.get("operator", {}), result.get("floor", {})
        return [
            (f"{result.get('jobs')} jobs: all children created (s)", _fmt(op.get("total_seconds")), _fmt(floor.get("total_seconds")), _fmt(result.get("ratio"), "x")),
            ("per job p50 / p99 (s)", f"{_fmt(op.get('p50_seconds'))} / {_fmt(op.get('p99_seconds'))}", f"{_fmt(floor.get('p50_seconds'))} / {_fmt(floor.get('p99_seconds'))}", ""),
            ("API requests per job", _fmt(op.get("requests_per_job")), _fmt(floor.get("requests_per_job")), ""),
            ("operator CPU (s) / peak RSS (MiB)", f"{_fmt(op.get('operator_cpu_seconds'))} / {_fmt(_mib(op.get('operator_peak_rss_bytes')))}", "", ""),
        ]
    if name == "serving":
        out = []
        for clients, figures in sorted((result.get("clients") or {}).items(), key=lambda kv: int(kv[0])):
            out.append((f"tokens/s at {clients} clients", _fmt(figures.get("kubetune_tokens_per_second")), _fmt(figures.get("baseline_tokens_per_second")), _fmt(figures.get("ratio"), "x")))
        if not out:
            out.append(("ratio", "", "", _fmt(result.get("ratio"), "x")))
        return out
    return []


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"KubeTune CPU benchmarks, {m['date']} on {m['cpu_model']} ({m['cpu_cores']} cores, {m['memory_bytes'] / 1024**3:.0f} GiB), "
        f"load average at start {m['load_average_1m_5m_15m']}; torch {m['torch']}, transformers {m['transformers']}, deepspeed {m['deepspeed']}."
        + (" QUICK (tiny sizes): not figures to publish." if results.get("quick") else ""),
        "",
        "| benchmark | figure | KubeTune | baseline | ratio (>1 better) | equal work | goal met |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in BENCHMARKS:
        if name not in results:
            continue
        result = results[name]
        work = _fmt(_get(result, "equal_work", "ok"))
        met = _fmt(_get(result, "goal", "met"))
        for i, (figure, kubetune, baseline, ratio) in enumerate(rows(name, result)):
            first = i == 0
            lines.append(f"| {name if first else ''} | {figure} | {kubetune} | {baseline} | {ratio} | {work if first else ''} | {met if first else ''} |")
    lines += ["", "Measured: " + "; ".join(f"{n} at {results[n].get('measured_at', '?')} (load {results[n].get('load_average_at_start', '?')}, {_fmt(results[n].get('seconds'))} s)" for n in BENCHMARKS if n in results)]
    lines += ["", "Goals: " + "; ".join(f"{n}: {results[n]['goal']['target']}" for n in BENCHMARKS if n in results and results[n].get("goal"))]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------


def write(results: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(results)
    (out / "cpu.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "cpu.md").write_text(table)
    return table


def run_all(names: list[str], workdir: Path, quick: bool, out: Optional[Path] = None, previous: Optional[dict] = None) -> dict:
    """Run the benchmarks in order; with `out`, the results so far are written after each one.
    With `previous` (an earlier cpu.json), its other benchmarks are kept."""
    results: dict[str, Any] = {"machine": machine(), "quick": quick, "command": "python -m bench.run_cpu" + (" --quick" if quick else "")}
    for name in BENCHMARKS:
        if previous and name in previous and name not in names:
            results[name] = previous[name]
    for name in names:
        started = time.monotonic()
        when = {"measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            result = BENCHMARKS[name](workdir / name, quick)
        except Exception as err:  # noqa: BLE001 - one failing benchmark must not hide the others
            traceback.print_exc()
            result = {"error": f"{type(err).__name__}: {err}"}
        result["seconds"] = time.monotonic() - started
        result.update(when)
        if "error" not in result:
            result["goal"] = goal(name, result)
        results[name] = rounded(result)
        results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        if out is not None:
            write(results, out)
        print(f"[bench] {name} done in {result['seconds']:.0f} s", file=sys.stderr, flush=True)
    return results


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that every benchmark runs")
    parser.add_argument("--only", help="comma-separated benchmarks: " + ", ".join(BENCHMARKS))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for cpu.json and cpu.md")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--merge", action="store_true", help="keep the other benchmarks of an existing OUT/cpu.json (with --only)")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    try:
        previous = json.loads((args.out / "cpu.json").read_text()) if args.merge and (args.out / "cpu.json").exists() else None
        results = run_all(names, workdir, args.quick, args.out, previous)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(markdown(results))
    return 0 if all("error" not in results[n] for n in names) else 1


if __name__ == "__main__":
    sys.exit(main())
