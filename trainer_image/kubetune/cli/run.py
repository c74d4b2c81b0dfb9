"""`kubetune run JOB.yaml`: the whole FineTuneJob on this machine.

validate -> torchrun the trainer (resumes by itself from the newest complete checkpoint)
-> merge (LoRA with output.merge) -> curves plot and summary -> serve and ask questions.
Local files of a run (logs, plot, answers, embedded S3 data) go to JOBDIR/runs/NAME/.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table

from ..api import exitcodes
from ..api.layout import JobLayout, job_layout
from ..api.spec import FineTuneJob, dump_job
from ..api.uri import parse_uri
from ..artifacts.net import die_with_parent
from ..artifacts.storage import open_store
from ..retention import describe, is_correct
from .check import job_problems, warning_lines
from .serving import LocalServer, ServerError, chat

console = Console()


@dataclass
class TrainResult:
    returncode: int
    preempted: bool = False
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    start: dict = field(default_factory=dict)
    done: dict = field(default_factory=dict)
    retention: dict = field(default_factory=dict)  # the trainer's `retention` event (spec.retention's probe report)
    resumed_from: Optional[str] = None
    last_checkpoint: Optional[str] = None
    seconds: float = 0.0
    log_tail: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# processes and commands (pure)


def machine_slots() -> tuple[int, str]:
    """How many training processes this machine can run: GPUs, else CPU cores."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return (gpus, "GPUs") if gpus else (os.cpu_count() or 1, "CPU cores")


def plan_processes(wanted: int, slots: int, unit: str) -> tuple[int, Optional[str]]:
    """The number of processes to start and a warning when the machine has fewer slots."""
    if wanted <= slots:
        return wanted, None
    return slots, (
        f"the job asks for {wanted} processes but this machine has {slots} {unit}: running {slots} "
        f"(the effective batch shrinks by {wanted / slots:g}x; raise training.gradientAccumulationSteps to keep it)"
    )


def trainer_command(job_file: Path, base_dir: Path, nproc: int) -> list[str]:
    args = ["-m", "kubetune.train.main", "--job", str(job_file), "--base-dir", str(base_dir)]
    if nproc == 1:
        return [sys.executable, *args]
    # --standalone: a private rendezvous on a free port, so parallel runs never collide.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]


def child_env(nproc: int, extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **extra, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A local run exports no Prometheus metrics unless asked (port 9400 may be taken).
    env.setdefault("KUBETUNE_METRICS_PORT", "0")
    return env


def s3_buckets(job: FineTuneJob) -> list[str]:
    return sorted({parse_uri(loc).bucket for _, loc in job.spec.locations() if loc.startswith("s3://")})


# ---------------------------------------------------------------------------------------
# training with a live progress bar


def train(cmd: list[str], env: dict[str, str], log_path: Path, verbose: bool) -> TrainResult:
    """Run the trainer; JSON-line events on its stdout drive the progress bar.

    Ctrl-C is forwarded as SIGINT: the trainer finishes the step, saves a checkpoint and
    exits (event `preempted`). A second Ctrl-C sends SIGTERM, a third kills it.
    """
    result = TrainResult(returncode=0)
    tail: deque[str] = deque(maxlen=40)
    started = time.monotonic()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "a", encoding="utf-8")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, bufsize=1, start_new_session=True, preexec_fn=die_with_parent())

    def copy_stderr() -> None:
        for line in proc.stderr:
            log.write(line)
            log.flush()
            tail.append(line.rstrip())
            if verbose:
                console.print(line.rstrip(), style="dim", markup=False, highlight=False)

    threading.Thread(target=copy_stderr, daemon=True).start()
    presses = [0]

    def on_interrupt(signum, frame) -> None:
        presses[0] += 1
        sig = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)[min(presses[0], 3) - 1]
        if presses[0] == 1:
            console.print("[yellow]stopping: the trainer finishes this step and saves a checkpoint (Ctrl-C again to hurry it)[/]")
        try:
            os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
        except ProcessLookupError:
            pass

    # Ctrl-C and `kill` both stop the run cleanly, with a checkpoint.
    previous = {sig: signal.signal(sig, on_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    columns = (
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"), TextColumn("ETA {task.fields[eta]}"),
    )  # fmt: skip
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("starting", total=None, loss="-", tps="-", eta="-")
            for line in proc.stdout:
                event = _event(line)
                if event is None:
                    if line.strip():
                        progress.console.print(line.rstrip(), markup=False, highlight=False)
                    continue
                _apply(event, result, progress, task)
        result.returncode = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            # torchrun's workers run in their own sessions: let torchrun stop them.
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
    result.seconds = time.monotonic() - started
    result.log_tail = list(tail)
    return result


def _event(line: str) -> Optional[dict]:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def _fmt_eta(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def _apply(event: dict, result: TrainResult, progress: Progress, task) -> None:
    kind = event["event"]
    if kind == "start":
        result.start = event
        progress.update(task, description=f"training ({event.get('world_size', 1)} proc)", total=event.get("total_steps"))
    elif kind == "resume":
        result.resumed_from = event.get("from")
        progress.console.print(f"resumed from checkpoint {event.get('from')} (step {event.get('step')})")
        progress.update(task, completed=event.get("step", 0))
    elif kind == "step":
        result.steps.append(event)
        progress.update(
            task, completed=event["step"], total=event.get("total_steps") or progress.tasks[0].total,
            loss=f"{event['loss']:.4f}" if event.get("loss") is not None else "-",
            tps=f"{event['tokens_per_second']:.0f}" if event.get("tokens_per_second") is not None else "-",
            eta=_fmt_eta(event.get("eta_seconds")),
        )  # fmt: skip
    elif kind == "checkpoint":
        name, committed = event.get("name"), event.get("committed", event.get("name"))
        result.last_checkpoint = committed
        uploading = "" if committed == name else " (uploading while training goes on)"
        progress.console.print(f"checkpoint {name} saved in {event.get('seconds', 0):.1f}s{uploading}")
    elif kind == "eval":
        result.evals.append(event)
        progress.console.print(f"step {event.get('step')}: validation loss {event.get('validation_loss')}")
    elif kind == "replay":
        how = "read from the cache" if event.get("cached") else f"generated in {event.get('seconds', 0):.0f} s"
        reworded = f", {event.get('reworded_samples')} rewrites of {event.get('reworded_questions')}/{event.get('rewrite_questions')} of your questions" if event.get("rewrite_questions") else ""
        matched = " (KL to the base)" if event.get("loss") == "kl" else ""
        progress.console.print(f"retention: {event.get('samples')} base-model answers to replay{matched}{reworded}, {event.get('probes')} probes ({how})")
    elif kind == "retention":
        result.retention = event
        progress.console.print(f"[{'yellow' if event.get('below_threshold') else 'green'}]retention: {describe(event)}[/]")
        for lost in event.get("lost", []):
            progress.console.print(f"  lost: {lost['question']} base: {_short(lost['base'], 80)!r} tuned: {_short(lost['tuned'], 80)!r}", markup=False, highlight=False)
    elif kind == "preempted":
        result.preempted = True
        progress.update(task, description="stopped")
    elif kind == "done":
        result.done = event
        progress.update(task, description="done", completed=event.get("step", progress.tasks[0].completed))


# ---------------------------------------------------------------------------------------
# after training: merge, curves, summary


def prepare_base_model(job: FineTuneJob, base_dir: Path, endpoint: Optional[str]) -> Path:
    """Download / dequantize the base model once, in this process, before the ranks start:
    one visible step instead of N processes waiting on each other's conversion."""
    from ..artifacts.model_source import default_cache_dir, materialize_model

    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' conversion bars; the spinner says what happens
    with console.status(f"preparing the base model {job.spec.model.uri}" + (f" ({job.spec.model.gguf_file}, dequantized once)" if job.spec.model.gguf_file else "")):
        return materialize_model(job.spec.model, default_cache_dir(), base_dir=base_dir, endpoint=endpoint)


def merge(job_file: Path, base_dir: Path, env: dict[str, str], log_path: Path) -> float:
    started = time.monotonic()
    with console.status("merging the LoRA adapter into the base model"), open(log_path, "a") as log:
        proc = subprocess.run([sys.executable, "-m", "kubetune.train.main", "--job", str(job_file), "--base-dir", str(base_dir), "--merge"], env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent())
    if proc.returncode != 0:
        raise RuntimeError(f"merge failed with exit code {proc.returncode}; see {log_path}")
    return time.monotonic() - started


def read_metrics(layout: JobLayout, endpoint: Optional[str]) -> list[dict]:
    """Every logged step of the job (all runs, resumes included) from output/metrics.jsonl."""
    try:
        raw = open_store(layout.output, endpoint=endpoint).get_bytes("metrics.jsonl")
    except (FileNotFoundError, OSError):
        return []
    rows = []
    for line in raw.decode().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def plot_curves(rows: list[dict], evals: list[dict], path: Path, title: str) -> Optional[Path]:
    """loss / learning rate / grad norm against step, as a PNG."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("loss", "training loss"), ("learning_rate", "learning rate"), ("grad_norm", "gradient norm")]
    series = [(key, label) for key, label in series if any(r.get(key) is not None for r in rows)]
    fig, axes = plt.subplots(len(series), 1, figsize=(8, 2.6 * len(series)), sharex=True, squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], series):
        points = sorted((r["step"], r[key]) for r in rows if r.get(key) is not None)
        ax.plot([p[0] for p in points], [p[1] for p in points], label=label)
        if key == "loss" and evals:
            ax.plot([e["step"] for e in evals], [e["validation_loss"] for e in evals], "o-", label="validation loss")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary_table(job: FineTuneJob, result: TrainResult, layout: JobLayout, extra: dict[str, Any]) -> Table:
    table = Table(title=f"{job.metadata.name}: summary", show_header=False)
    table.add_column("item", style="bold")
    table.add_column("value")
    rows: dict[str, Any] = {
        "method": job.spec.method.type,
        "processes": result.start.get("world_size"),
        "trainable / total parameters": _params(result.start),
        "steps": result.done.get("step") or (result.steps[-1]["step"] if result.steps else None),
        "resumed from": result.resumed_from,
        "training time": f"{result.seconds:.0f} s",
    }
    shown = {"job", "world_size", "trainable_params", "total_params", "total_steps", "step", "packing_fill"}
    summary = result.done.get("summary") or {}
    for key, value in summary.items():
        if key not in shown and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            rows[key.replace("_", " ")] = f"{value:.4g}" if isinstance(value, float) else value
    if summary.get("packing_fill") is not None:
        rows["packing fill"] = f"{summary['packing_fill']:.1%} of the {job.spec.training.max_length}-token rows hold tokens"
    outputs = result.done.get("outputs") or {}
    rows["adapter"] = outputs.get("adapter") or (str(layout.adapter) if layout.adapter else None)
    rows["model"] = outputs.get("model") or (str(layout.model) if layout.model else None)
    rows["checkpoints"] = str(layout.checkpoints)
    if result.retention:
        rows["general knowledge kept"] = describe(result.retention)
    rows.update(extra)
    for key, value in rows.items():
        if value is not None:
            table.add_row(key, str(value))
    return table


def _params(start: dict) -> Optional[str]:
    if "trainable_params" not in start:
        return None
    return f"{start['trainable_params']:,} / {start.get('total_params', 0):,}"


# ---------------------------------------------------------------------------------------
# questions to the served model


def load_questions(path: Path) -> list[dict]:
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            raise ValueError(f"{path}:{number}: expected {{\"question\": ..., \"expect\": [...], \"kind\": ...}}")
        questions.append({"kind": item.get("kind", "question"), "question": item["question"], "expect": list(item.get("expect", []))})
    return questions


def ask_all(url: str, questions: list[dict], max_tokens: int, parallel: int = 8) -> list[str]:
    """Greedy answers, one question per conversation (the answer reflects the model, not the
    dice), sent concurrently so the server batches them."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(q: dict) -> str:
        return chat(url, [{"role": "user", "content": q["question"]}], temperature=0.0, max_tokens=max_tokens)

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(ask, questions))


def score(questions: list[dict], answers: list[str], base_answers: Optional[list[str]]) -> dict[str, dict[str, int]]:
    """Per kind: how many were answered right, and (with base answers) how many the base got right and kept."""
    scores: dict[str, dict[str, int]] = {}
    for i, q in enumerate(questions):
        right = is_correct(answers[i], q["expect"])
        if right is None:
            continue
        s = scores.setdefault(q["kind"], {"total": 0, "right": 0, "base_right": 0, "kept": 0})
        s["total"] += 1
        s["right"] += right
        if base_answers is not None and is_correct(base_answers[i], q["expect"]):
            s["base_right"] += 1
            s["kept"] += right
    return scores


def answers_table(questions: list[dict], answers: list[str], base_answers: Optional[list[str]]) -> Table:
    table = Table(title="answers of the tuned model" + (" (and the base model)" if base_answers else ""), show_lines=True)
    table.add_column("kind")
    table.add_column("question")
    table.add_column("tuned model")
    if base_answers:
        table.add_column("base model")
    mark = {True: "[green]✓[/] ", False: "[red]✗[/] ", None: ""}
    for i, q in enumerate(questions):
        row = [q["kind"], q["question"], mark[is_correct(answers[i], q["expect"])] + _short(answers[i])]
        if base_answers:
            row.append(mark[is_correct(base_answers[i], q["expect"])] + _short(base_answers[i]))
        table.add_row(*row)
    return table


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def score_lines(scores: dict[str, dict[str, int]], compared: bool) -> list[str]:
    lines = []
    for kind, s in scores.items():
        line = f"{kind}: {s['right']}/{s['total']} answered right ({100 * s['right'] / s['total']:.0f}%)"
        if compared:
            line += f"; the base model got {s['base_right']} right, {s['kept']} of them still right after tuning"
        lines.append(line)
    return lines


# ---------------------------------------------------------------------------------------
# the command


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds: servers and the embedded S3 stop


def run_command(args) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    job_path = Path(args.job).resolve()
    job, problems = job_problems(args.job, on_cluster=False)
    if problems:
        for line in problems:
            print(line, file=sys.stderr)
        return 1
    for line in warning_lines(args.job, job):
        console.print(f"[yellow]{escape(line)}[/]")
    base_dir = job_path.parent
    workdir = base_dir / "runs" / job.metadata.name
    workdir.mkdir(parents=True, exist_ok=True)
    questions = load_questions(Path(args.questions)) if args.questions else []
    wanted = args.nproc or job.spec.distributed.world_size
    nproc, warning = plan_processes(wanted, *machine_slots())
    if warning:
        console.print(f"[yellow]warning:[/] {warning}")
    timings: dict[str, Any] = {}
    started = time.monotonic()
    with ExitStack() as stack:
        job_file, extra_env, endpoint = job_path, {}, job.spec.storage.endpoint
        if args.embedded_s3:
            job_file, extra_env, endpoint = _embedded_s3(stack, job, workdir)
        os.environ.update(extra_env)  # this process reads metrics.jsonl from the same storage
        env = child_env(nproc, extra_env)
        layout = job_layout(job, base_dir)
        console.print(f"[bold]{job.metadata.name}[/]: {job.spec.method.type} on {nproc} process(es); logs in {workdir / 'train.log'}")
        try:
            prepare_base_model(job, base_dir, endpoint)
        except (OSError, ValueError) as err:
            console.print(f"[red]spec.model: {err}[/]")
            return exitcodes.INVALID_INPUT
        result = train(trainer_command(job_file, base_dir, nproc), env, workdir / "train.log", args.verbose)
        if result.preempted:
            console.print(
                f"[yellow]stopped at step {result.steps[-1]['step'] if result.steps else 0}; a checkpoint was saved.[/] "
                f"Resume with: kubetune run {args.job}" + (" --embedded-s3" if args.embedded_s3 else "")
            )
            return exitcodes.PREEMPTED
        if result.returncode != 0:
            console.print("\n".join(result.log_tail[-25:]), markup=False, highlight=False)
            console.print(f"[red]training failed with exit code {result.returncode}[/]; full log: {workdir / 'train.log'}")
            return result.returncode
        timings["training time"] = f"{result.seconds:.0f} s"
        if layout.needs_merge:
            try:
                timings["merge time"] = f"{merge(job_file, base_dir, env, workdir / 'merge.log'):.0f} s"
            except RuntimeError as err:
                console.print(f"[red]{err}[/]")
                return 1
        rows = read_metrics(layout, endpoint) or result.steps
        curves = plot_curves(rows, result.evals, workdir / "curves.png", f"{job.metadata.name} ({job.spec.method.type})")
        timings["curves"] = str(curves) if curves else None
        if job.spec.serving.enabled and not args.no_serve:
            code = _serve_and_ask(args, job, job_file, base_dir, layout, questions, workdir, timings)
            if code:
                return code
        timings["total time"] = f"{time.monotonic() - started:.0f} s"
        console.print(summary_table(job, result, layout, timings))
    return 0


def _embedded_s3(stack: ExitStack, job: FineTuneJob, workdir: Path) -> tuple[Path, dict[str, str], str]:
    """Start SeaweedFS for the run (data kept in workdir/s3, so a re-run resumes) and write
    the job with its storage endpoint pointing there."""
    from ..artifacts.embedded_s3 import SeaweedS3

    with console.status("starting the embedded S3 server"):
        server = stack.enter_context(SeaweedS3(workdir / "s3", buckets=tuple(s3_buckets(job))))
    console.print(f"embedded S3 at {server.endpoint} (buckets: {', '.join(s3_buckets(job)) or 'none'})")
    document = dump_job(job)
    document["spec"].setdefault("storage", {})["endpoint"] = server.endpoint
    effective = workdir / "job.embedded-s3.yaml"
    effective.write_text(yaml.safe_dump(document, sort_keys=False))
    return effective, server.env, server.endpoint


def _serve_and_ask(args, job: FineTuneJob, job_file: Path, base_dir: Path, layout: JobLayout, questions: list[dict], workdir: Path, timings: dict) -> int:
    model = job.spec.model
    base_uri = parse_uri(model.uri, base_dir)
    base_location = str(base_uri.join(model.gguf_file) if model.gguf_file else base_uri)
    serving = str(layout.serving_model)
    base_for_adapter = base_location if layout.model is None else None
    max_tokens = min(job.spec.serving.generation.max_tokens, 96)
    try:
        base_answers = None
        if questions and args.compare_base:
            with console.status("asking the base model"), LocalServer(base_location, job=job_file, log_path=workdir / "serve-base.log") as server:
                base_answers = ask_all(server.url, questions, max_tokens)
        started = time.monotonic()
        with console.status("starting kubetune-serve on the tuned model"):
            server = LocalServer(serving, base_model=base_for_adapter, job=job_file, port=args.port, log_path=workdir / "serve.log").start()
        try:
            timings["server ready after"] = f"{time.monotonic() - started:.0f} s"
            console.print(f"serving {serving} at {server.url}/v1 (OpenAI API); try: kubetune chat {server.url}")
            if questions:
                with console.status(f"asking {len(questions)} questions"):
                    answers = ask_all(server.url, questions, max_tokens)
                console.print(answers_table(questions, answers, base_answers))
                scores = score(questions, answers, base_answers)
                for line in score_lines(scores, base_answers is not None):
                    console.print(line)
                (workdir / "answers.json").write_text(
                    json.dumps({"questions": questions, "answers": answers, "base_answers": base_answers, "scores": scores}, indent=2, ensure_ascii=False)
                )
                timings["answers"] = str(workdir / "answers.json")
            if args.keep_serving:
                console.print("serving until Ctrl-C")
                try:
                    server.proc.wait()
                except KeyboardInterrupt:
                    pass
        finally:
            server.stop()
    except ServerError as err:
        console.print(f"[red]serving failed: {err}[/]")
        return 1
    return 0
