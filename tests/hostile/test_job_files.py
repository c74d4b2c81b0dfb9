"""Hostile job files through `kubetune validate` and `kubetune plan` as a user runs them: each
one exits non-zero with `FILE:LINE: FIELD: MESSAGE` lines (the operator's parser and
messages), never a traceback, in bounded time and memory (issue 18). `plan` refuses what
`validate` refuses."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from kubetune.api.spec import SpecError, load_job
from kubetune.cli import main

HEAD = "apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\n"
SPEC = "spec: {model: {uri: m}, dataset: {uri: d}}\n"
INT64 = "must fit in 64 bits (-9223372036854775808 to 9223372036854775807)"

# (file text after HEAD, the problems validate and plan print, with job.yaml for the path)
CASES = {
    "recursive-alias": (
        "metadata: &m {name: a, labels: *m}\n" + SPEC,
        ["job.yaml:3: metadata.labels: the value contains itself (a recursive YAML alias)"],
    ),
    "lists-nested-500-deep": (
        "metadata: {name: a}\nspec: {model: {uri: m}, dataset: {uri: d}, affinity: {x: " + "[" * 500 + "]" * 500 + "}}\n",
        ["job.yaml:4: spec.affinity.x.0.0.0.…: nested deeper than 64 levels"],
    ),
    "more-than-10000-values": (  # refused while composing: a 1.5 MiB file of tiny values costs seconds, not minutes
        "metadata: {name: a}\nspec:\n  model: {uri: m}\n  dataset: {uri: d}\n  affinity:\n" + "".join(f"    k{i}: [1, 2]\n" for i in range(6000)),
        ["job.yaml:2502: spec.affinity.k2494: the document has more than 10000 values"],
    ),
    "alias-bomb": (
        "metadata: {name: a}\nspec:\n  model: {uri: m}\n  dataset: {uri: d}\n  affinity:\n    l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n"
        + "".join(f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]\n" for i in range(1, 6)),
        ["job.yaml:8: spec.affinity.l3.7.8.8: the document has more than 10000 values once its YAML aliases are expanded"],
    ),
    "5000-digit-integer": (
        "metadata: {name: a}\nspec:\n  model: {uri: m}\n  dataset: {uri: d}\n  training:\n    seed: " + "1" * 5000 + "\n",
        [f"job.yaml:8: spec.training.seed: integer out of range: {INT64}"],
    ),
    "int-beyond-int64": (
        "metadata: {name: a}\nspec:\n  model: {uri: m}\n  dataset: {uri: d}\n  training: {microBatchSize: " + "9" * 400 + "}\n",
        [f"job.yaml:7: spec.training.microBatchSize: integer out of range: {INT64}"],
    ),
    "inf": (
        "metadata: {name: a}\nspec:\n  model: {uri: m}\n  dataset: {uri: d}\n  training:\n    epochs: .inf\n",
        ["job.yaml:8: spec.training.epochs: not a finite number (got .inf)"],
    ),
    "nan": (
        "metadata: {name: a}\nspec:\n  model: {uri: m}\n  dataset: {uri: d}\n  training:\n    learningRate: .NaN\n    weightDecay: -.inf\n",
        ["job.yaml:8: spec.training.learningRate: not a finite number (got .NaN)", "job.yaml:9: spec.training.weightDecay: not a finite number (got -.inf)"],
    ),
    "duplicate-key": (
        "metadata: {name: a}\nmetadata: {name: b}\n" + SPEC,
        ["job.yaml:4: metadata: duplicate field (first on line 3); the API server refuses duplicate fields"],
    ),
    "duplicate-nested-key": (
        "metadata: {name: a}\nspec:\n  model: {uri: m}\n  dataset: {uri: d}\n  training: {seed: 1, seed: 2}\n",
        ["job.yaml:7: spec.training.seed: duplicate field (first on line 7); the API server refuses duplicate fields"],
    ),
    "nul-byte-in-name": (
        "metadata:\n  name: a\0b\n" + SPEC,
        ["job.yaml:4: invalid YAML: unacceptable character #x0000: special characters are not allowed"],
    ),
    "semantic-problem": (
        "metadata: {name: a}\nspec:\n  model: {uri: m}\n  dataset: {uri: d}\n  output: {merge: false}\n  serving: {enabled: true, engine: vllm}\n",
        ["job.yaml:7: spec.output.merge: serving.engine vllm serves the merged model; set output.merge: true or use engine builtin"],
    ),
}


def _run(capsys, command: str, path) -> tuple[int, list[str]]:
    args = [command, str(path)] + (["--model-config", "smollm2-135m"] if command == "plan" else [])
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err.replace(str(path), "job.yaml").splitlines()


@pytest.mark.parametrize("command", ["validate", "plan"])
@pytest.mark.parametrize("case", CASES)
def test_hostile_job_files_are_refused_with_file_line_field(tmp_path, capsys, case, command):
    text, expected = CASES[case]
    path = tmp_path / "job.yaml"
    path.write_text(HEAD + text)
    code, err = _run(capsys, command, path)
    assert code == 1
    assert err == expected + ([f"job.yaml: {len(expected)} problem{'s' if len(expected) > 1 else ''}"] if command == "validate" else [])


@pytest.mark.parametrize("command", ["validate", "plan"])
def test_a_directory_is_not_a_job_file(tmp_path, capsys, command):
    folder = tmp_path / "job.yaml"
    folder.mkdir()
    code, err = _run(capsys, command, folder)
    assert code == 1
    assert err[0] == "job.yaml: is a directory, not a job file"


def test_a_huge_file_is_refused_by_its_size_before_it_is_read(tmp_path, capsys):
    from kubetune.api.spec import MAX_JOB_BYTES

    path = tmp_path / "job.yaml"
    with open(path, "w") as f:  # 63 MB of plausible YAML
        f.write(HEAD + "metadata: {name: a}\n" + SPEC + "  affinity:\n")
        line = "    k{}: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]\n"
        for i in range(63 * 1024**2 // len(line)):
            f.write(line.format(i))
    size = path.stat().st_size
    assert size > 60 * 1024**2
    tracemalloc.start()
    try:
        with pytest.raises(SpecError) as info:
            load_job(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(info.value).replace(str(path), "job.yaml") == (
        f"job.yaml: the file is {size / 1024**2:.1f} MiB; a FineTuneJob is at most 1.5 MiB (the most the API server stores for one object)"
    )
    assert peak < MAX_JOB_BYTES  # refused without reading it
    for command in ("validate", "plan"):
        code, err = _run(capsys, command, path)
        assert code == 1 and err[0].startswith("job.yaml: the file is ")


def test_a_file_at_the_size_limit_is_still_read(tmp_path):
    from kubetune.api.spec import MAX_JOB_BYTES

    path = tmp_path / "job.yaml"
    body = HEAD + "metadata: {name: a}\n" + SPEC
    path.write_text(body + "#" * (MAX_JOB_BYTES - len(body) - 1) + "\n")
    assert path.stat().st_size == MAX_JOB_BYTES
    assert load_job(path).metadata.name == "a"


def test_a_stream_is_read_only_up_to_the_limit(tmp_path):
    import os
    import threading

    fifo = tmp_path / "job.yaml"
    os.mkfifo(fifo)

    def stream():  # a writer with 8 MiB to give; the reader must stop at the limit
        try:
            with open(fifo, "w") as f:
                f.write(HEAD)
                for _ in range(8 * 1024):
                    f.write("# " + "x" * 1021 + "\n")
        except BrokenPipeError:
            pass

    writer = threading.Thread(target=stream, daemon=True)
    writer.start()
    with pytest.raises(SpecError) as info:
        load_job(fifo)
    assert str(info.value) == f"{fifo}: more than 1.5 MiB; a FineTuneJob is at most 1.5 MiB (the most the API server stores for one object)"
    writer.join(30)
    assert not writer.is_alive()


@pytest.mark.parametrize(
    "config, message",
    [
        ('{"hidden_size": 1e400, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 100}', "model config hidden_size: expected a whole number from 1 to 2147483648, got inf"),
        ('{"hidden_size": "big", "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 100}', "model config hidden_size: expected a whole number from 1 to 2147483648, got 'big'"),
        ('{"hidden_size": 64, "num_attention_heads": 0, "num_hidden_layers": 2, "vocab_size": 100}', "model config num_attention_heads: expected a whole number from 1 to 2147483648, got 0"),
        ('{"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 100000000000, "vocab_size": 100}', "model config num_hidden_layers: expected a whole number from 1 to 10000, got 100000000000"),
        ('{"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": true}', "model config vocab_size: expected a whole number from 1 to 2147483648, got True"),
    ],
    ids=["inf", "text", "zero-heads", "1e11-layers", "bool"],
)
def test_plan_refuses_a_hostile_model_config_by_its_key(tmp_path, capsys, config, message):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(config)
    path = tmp_path / "job.yaml"
    path.write_text(HEAD + "metadata: {name: a}\n" + SPEC)
    assert main(["plan", str(path), "--model-config", str(tmp_path / "model")]) == 1
    assert capsys.readouterr().err.replace(str(path), "job.yaml").splitlines() == [f"job.yaml: {message}"]


def test_plan_refuses_a_gpu_memory_too_large_to_count(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(HEAD + "metadata: {name: a}\n" + SPEC)
    huge = "9" * 400 + "Gi"
    assert main(["plan", str(path), "--model-config", "smollm2-135m", "--gpu-memory", huge]) == 1
    assert capsys.readouterr().err.replace(str(path), "job.yaml").splitlines() == [f"job.yaml: {huge!r} is too large a memory size"]


def test_the_largest_int64_job_is_planned(tmp_path, capsys):
    # Every number at the int64 limit the API server allows: the estimate is astronomic, not an error.
    path = tmp_path / "job.yaml"
    big = 2**63 - 1
    path.write_text(
        HEAD + "metadata: {name: a}\nspec:\n  model: {uri: m}\n  dataset: {uri: d}\n"
        f"  training: {{microBatchSize: {big}, maxLength: {big}, gradientAccumulationSteps: {big}}}\n"
        "  distributed: {nodes: 1024, gpusPerNode: 64, zero: {stage: 3, offload: all}}\n"
        f"  method: {{type: lora, lora: {{r: 1024}}}}\n"
    )
    assert main(["plan", str(path), "--model-config", "llama-3-8b", "--json", "--gpu-memory", "80Gi"]) == 0
    estimate = json.loads(capsys.readouterr().out)
    assert estimate["per_gpu_bytes"] > 2**63 and estimate["fits"] is False
    assert main(["plan", str(path), "--model-config", "llama-3-8b", "--gpu-memory", "80Gi"]) == 3  # the table, and "does not fit"
    assert "does not fit" in capsys.readouterr().out
