"""The container images (no Docker engine here): the Dockerfiles are checked as text, and
everything they run is run: the operator module imports without torch, kopf and the
console scripts of the trainer image start and print their usage."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from kubetune.api.spec import Tracker

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def final_stage(steps):
    start = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[start:]


def last(steps, op):
    return [args for o, args in steps if o == op][-1]


def exec_form(args: str) -> list[str]:
    return json.loads(args)


def run(*command: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, env=ENV, cwd=REPO)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "trainer_image/Dockerfile"])
def test_images_copy_only_existing_sources_and_run_as_non_root(dockerfile):
    steps = instructions(REPO / dockerfile)
    for op, args in steps:
        if op == "COPY" and "--from=" not in args:
            *sources, _ = args.split()
            for source in sources:
                assert (REPO / source).exists(), f"{dockerfile}: COPY {source} does not exist (build context: repository root)"
    user = last(final_stage(steps), "USER").split(":")[0]
    assert user.isdigit() and int(user) != 0, f"{dockerfile}: USER {user} must be a numeric non-root uid"


def operator_command_of_chart() -> list[str]:
    with helm.Chart.load(REPO / "charts" / "kubetune") as chart:
        manifest = chart.render({}, name="kt", namespace="kt")["kubetune/templates/deployment.yaml"]
    return yaml.safe_load(manifest)["spec"]["template"]["spec"]["containers"][0]["command"]


def test_operator_image_and_chart_start_the_operator_module_the_same_way():
    steps = final_stage(instructions(REPO / "Dockerfile"))
    command = exec_form(last(steps, "ENTRYPOINT"))
    assert command == operator_command_of_chart() == ["python", "-m", "kubetune_operator"]
    installs = " ".join(args for op, args in instructions(REPO / "Dockerfile") if op == "RUN" and "pip" in args)
    assert "[operator]" in installs and "train" not in installs and "torch" not in installs


def test_operator_module_imports_without_torch():
    code = ("import sys, kubetune_operator.__main__ as entry; assert callable(entry.main); "
            "heavy = sorted(m for m in ('torch', 'transformers', 'deepspeed', 'peft') if m in sys.modules); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = run(sys.executable, "-c", code, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_trainer_image_is_a_cuda_pytorch_image_with_our_package():
    steps = instructions(REPO / "trainer_image" / "Dockerfile")
    base = [args for op, args in steps if op == "ARG" and args.startswith("BASE_IMAGE=")][0].split("=", 1)[1]
    assert base.startswith("pytorch/pytorch:") and "cuda" in base and base.endswith("-devel")
    installs = " ".join(args for op, args in steps if op == "RUN" and "pip install" in args)
    extras = re.search(r'"\.\[([a-z,]+)\]"', installs).group(1).split(",")
    # QLoRA's bitsandbytes and every tracker spec.training.reportTo may name are in the image.
    assert {"train", "serve", "qlora", *(t.value for t in Tracker)} <= set(extras)
    env = " ".join(args for op, args in steps if op == "ENV")
    assert "TORCH_EXTENSIONS_DIR=/var/cache/kubetune/torch_extensions" in env
    made_writable = " ".join(args for op, args in steps if op == "RUN" and "chmod" in args)
    assert "/var/cache/kubetune/torch_extensions" in made_writable


def test_trainer_image_user_is_the_uid_the_operator_runs_pods_as():
    from kubetune_operator import builders

    user = last(final_stage(instructions(REPO / "trainer_image" / "Dockerfile")), "USER").split(":")[0]
    assert int(user) == builders.RUN_AS


@pytest.mark.parametrize("command,usage", [
    (["kubetune-train", "--help"], "--job"),
    (["kubetune-serve", "--help"], "--model"),
    ([sys.executable, "-m", "kubetune.train.main", "--help"], "--job"),  # what torchrun runs in worker pods
])
def test_trainer_image_entrypoints_start(command, usage):
    if not command[0].startswith("/"):
        command = [str(BIN / command[0]), *command[1:]]
    result = run(*command)
    assert result.returncode == 0, f"{shlex.join(command)}: {result.stdout}{result.stderr}"
    # kubetune-train keeps stdout for its JSON events: help, like every human text, is on stderr.
    assert usage in result.stdout + result.stderr


def test_kind_install_script_is_valid_bash_and_its_values_pass_the_schema():
    """charts/kubetune/scripts/kind-install.sh (needs docker/kind, so not run here): bash
    parses it, and the --set values it gives Helm are accepted by values.schema.json."""
    script = REPO / "charts" / "kubetune" / "scripts" / "kind-install.sh"
    assert run("bash", "-n", str(script)).returncode == 0
    text = script.read_text().replace("$tag", "dev").replace("$watch", "team-a")
    values: dict = {}
    for expression in re.findall(r'--set "?([^"\s]+)"?', text):
        _merge(values, helm.parse_set_string(expression))
    assert values["images"]["operator"] == {"repository": "kubetune/operator", "tag": "dev", "pullPolicy": "Never"}
    assert values["watchNamespaces"] == ["team-a"]
    with helm.Chart.load(REPO / "charts" / "kubetune") as chart:
        chart.validate_schema(values)
        rendered = chart.render(values, name="kubetune", namespace="kubetune-system")
    deployment = yaml.safe_load(rendered["kubetune/templates/deployment.yaml"])
    assert deployment["metadata"]["name"] == "kubetune"  # what the script waits for
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "kubetune/operator:dev"


def _merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
