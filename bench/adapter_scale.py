"""Does a tuned LoRA forget less when its update is shrunk toward the base before merging?

    python -m bench.adapter_scale WORKDIR/retention-quickstart-TAG [--scales 1.0,0.85,0.7]

WiSE-FT-style interpolation, measured on a run `python -m bench.retention` left behind (its
job folder): the run's adapter is loaded on the base model with every LoRA scaling
multiplied by s (s = 1 is the trained model, 0 the base), merged, and asked what
`bench.retention --fast` asks (greedy, in this process): the set's question file (trained,
reworded, general), the 60 more general questions, and the trainer's 94 probes against the
base model's probe answers from the run's retention cache. No training runs. Appends one
record per folder to bench/results/adapter_scale.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import yaml

from bench.common import RESULTS_DIR, machine
from bench.retention import GENERAL, SETS, answers_of, base_answers_in_process, max_tokens


def scaled_model(base_dir: Path, adapter_dir: Path, scale: float):
    """The base model with the adapter merged in at `scale` times its trained update."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.scaling:
                module.scaling[name] *= scale
    return model.merge_and_unload().eval()


def measure(folder: Path, scales: list[float]) -> dict:
    from transformers import AutoTokenizer

    from kubetune.api.spec import ModelSpec, RetentionSpec
    from kubetune.artifacts.model_source import default_cache_dir, materialize_model
    from kubetune.cli.run import load_questions, score
    from kubetune.retention.measure import retention_report
    from kubetune.retention.sets import load_probes

    document = yaml.safe_load((folder / "job.yaml").read_text())
    run_dir = folder / "runs" / document["metadata"]["name"]
    set_name = next(name for name in SETS if folder.name.startswith(f"retention-{name}"))
    questions_path = SETS[set_name][1]
    workdir = folder.parent
    base_dir = materialize_model(ModelSpec.model_validate(document["spec"]["model"]), default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    asked, more = load_questions(questions_path), load_questions(GENERAL)
    base_asked = base_answers_in_process(document, questions_path, asked, workdir)
    base_more = base_answers_in_process(document, GENERAL, more, workdir)
    (cache,) = (run_dir / "output" / "checkpoints" / "retention").glob("base-answers-*.json")
    cached = json.loads(cache.read_text())["probes"]
    probes = {p.question: p for p in load_probes(None, workdir)}
    probes = [probes[r["question"]] for r in cached]
    probe_tokens = RetentionSpec.model_validate(document["spec"].get("retention") or {}).probes.max_new_tokens
    rows = []
    for scale in scales:
        model = scaled_model(base_dir, run_dir / "output" / "adapter", scale)
        tuned = score(asked, answers_of(model, tokenizer, [q["question"] for q in asked], max_tokens(document)), base_asked)
        tuned_more = score(more, answers_of(model, tokenizer, [q["question"] for q in more], max_tokens(document)), base_more)
        report = retention_report(probes, [r["answer"] for r in cached], answers_of(model, tokenizer, [p.question for p in probes], probe_tokens), 0.9)
        row = {
            "scale": scale,
            "trained": tuned.get("trained", {}).get("right"),
            "reworded": tuned.get("reworded", {}).get("right"),
            "general_kept": f"{tuned['general']['kept']}/{tuned['general']['base_right']}",
            "general_more_kept": f"{tuned_more['general']['kept']}/{tuned_more['general']['base_right']}",
            "probes_kept": f"{report['kept']}/{report['base_right']}",
        }
        rows.append(row)
        print(f"scale {scale}: trained {row['trained']}/{tuned['trained']['total']}, reworded {row['reworded']}/{tuned['reworded']['total']}, "
              f"general {row['general_kept']}, 60 more {row['general_more_kept']}, probes {row['probes_kept']}", flush=True)  # fmt: skip
        del model
    return {"run": str(folder), "set": set_name, "rows": rows, "machine": machine()}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.adapter_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="bench.retention job folders (WORKDIR/retention-SET-TAG)")
    parser.add_argument("--scales", default="1.0,0.85,0.7", help="comma-separated multipliers of the trained LoRA update")
    parser.add_argument("--out", default=str(RESULTS_DIR / "adapter_scale.json"), help="results JSON (appended to its `runs`)")
    args = parser.parse_args(argv)
    scales = [float(s) for s in args.scales.split(",")]
    out = Path(args.out)
    document = json.loads(out.read_text()) if out.exists() else {"runs": []}
    for folder in args.folders:
        document["runs"].append(measure(Path(folder), scales))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
