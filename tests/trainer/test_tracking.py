"""Experiment trackers (spec.training.reportTo): every tracker is read back with its own
reader — TensorBoard's EventAccumulator, SwanLab's and W&B's transaction logs, MLflow's
client — after running offline (no network); TensorBoard also through real S3 (SeaweedFS)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import yaml

from kubetune.api.layout import job_layout
from kubetune.api.spec import parse_job
from kubetune.api.uri import parse_uri
from kubetune.artifacts.net import free_port
from kubetune.train import tracking

STEPS = [
    {"step": 1, "total_steps": 3, "epoch": 0.33, "loss": 2.5, "learning_rate": 1e-4, "grad_norm": 1.5, "tokens_per_second": 900.0, "eta_seconds": 2.0},
    {"step": 2, "total_steps": 3, "epoch": 0.67, "loss": 2.0, "learning_rate": 5e-5, "grad_norm": None, "tokens_per_second": 950.0, "eta_seconds": 1.0},
    {"step": 3, "total_steps": 3, "epoch": 1.0, "loss": 1.5, "learning_rate": 0.0, "grad_norm": 0.5, "tokens_per_second": 1000.0, "eta_seconds": 0.0},
]
EVALUATION = {"step": 3, "validation_loss": 1.75, "exact_match": 50.0, "rouge_1": 40.0, "rouge_2": 20.0, "rouge_l": 35.0, "bleu_4": 12.5}


def job(tmp_path, report_to, **training):
    doc = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "tracked"},
        "spec": {"model": {"uri": "m"}, "dataset": {"uri": "d.jsonl"}, "training": {"reportTo": report_to, **training}},
    }
    parsed = parse_job(doc)
    return parsed, job_layout(parsed, tmp_path)


def feed(tracker) -> None:
    for record in STEPS:
        tracker.step(record)
    tracker.evaluation(EVALUATION)
    tracker.close()


def expected() -> dict[str, dict[int, float]]:
    """tag -> {step: value} that every tracker must hold after feed()."""
    out: dict[str, dict[int, float]] = {}
    for record in STEPS:
        for name in tracking.TRAIN_FIGURES:
            if record[name] is not None:
                out.setdefault(f"train/{name}", {})[record["step"]] = record[name]
    for name, value in EVALUATION.items():
        if name != "step":
            out.setdefault(f"eval/{name}", {})[EVALUATION["step"]] = value
    return out


def test_scalars_are_the_prometheus_figures_and_every_evaluation_number():
    assert tracking.train_scalars(STEPS[1]) == {"train/loss": 2.0, "train/learning_rate": 5e-5, "train/tokens_per_second": 950.0, "train/epoch": 0.67}
    assert tracking.eval_scalars({"event": "eval", **EVALUATION})["eval/bleu_4"] == 12.5
    assert set(tracking.eval_scalars(EVALUATION)) == {f"eval/{k}" for k in EVALUATION if k != "step"}


def tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def assert_same(got: dict[str, dict[int, float]], want: dict[str, dict[int, float]]) -> None:
    assert set(got) == set(want)
    for tag, values in want.items():
        assert got[tag] == pytest.approx(values, rel=1e-6), tag


def test_tensorboard_event_files_in_the_output_folder_read_back_and_a_restart_replaces_later_steps(tmp_path):
    parsed, layout = job(tmp_path, ["tensorboard"])
    [tracker] = tracking.build_trackers(parsed, layout, is_main=True)
    feed(tracker)
    folder = tmp_path / "runs/tracked/output/tensorboard"
    assert_same(tensorboard_scalars(folder), expected())

    # A restart from a checkpoint at step 1 logs steps 2-3 again with other values: TensorBoard
    # shows the new ones (the purge step drops the first attempt's steps >= 2).
    [again] = tracking.build_trackers(parsed, layout, is_main=True)
    for record in STEPS[1:]:
        again.step({**record, "loss": record["loss"] + 10})
    again.close()
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2
    assert tensorboard_scalars(folder)["train/loss"] == {1: 2.5, 2: 12.0, 3: 11.5}


def test_tensorboard_to_s3_uploads_through_the_storage_layer(tmp_path, s3_env, seaweed):
    from kubetune.artifacts.storage import open_store

    parsed, layout = job(tmp_path, ["tensorboard"])
    layout = layout.__class__(**{**layout.__dict__, "tensorboard": parse_uri("s3://outputs/tracked/tensorboard")})
    [tracker] = tracking.build_trackers(parsed, layout, is_main=True)
    tracker.sync_seconds = 0.0  # upload after every log: the files are there while training runs
    tracker.step(STEPS[0])
    synced = tmp_path / "synced"
    open_store("s3://outputs/tracked/tensorboard").get_dir("", synced)
    assert tensorboard_scalars(synced)["train/loss"] == {1: 2.5}
    for record in STEPS[1:]:
        tracker.step(record)
    tracker.evaluation(EVALUATION)
    tracker.close()
    open_store("s3://outputs/tracked/tensorboard").get_dir("", synced)
    assert_same(tensorboard_scalars(synced), expected())


def test_other_ranks_get_no_trackers(tmp_path):
    parsed, layout = job(tmp_path, ["tensorboard", "mlflow"])
    assert tracking.build_trackers(parsed, layout, is_main=False) == []
    assert not (tmp_path / "runs").exists()


def test_a_missing_package_is_named_with_the_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without wandb imports
    parsed, layout = job(tmp_path, ["tensorboard", "wandb"])
    with pytest.raises(tracking.TrackerError, match=r"reportTo wandb: the wandb package is not installed; pip install 'kubetune\[wandb\]'"):
        tracking.build_trackers(parsed, layout, is_main=True)


def test_mlflow_offline_store_and_a_restart_continues_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path}/mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    parsed, layout = job(tmp_path, ["mlflow"], learningRate=3e-4)
    [tracker] = tracking.build_trackers(parsed, layout, is_main=True)
    feed(tracker)
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("kubetune").experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["training.learningRate"] == "0.0003"
    got = {tag: {m.step: m.value for m in client.get_metric_history(run.info.run_id, tag)} for tag in run.data.metrics}
    assert_same(got, expected())

    [again] = tracking.build_trackers(parsed, layout, is_main=True)
    assert client.get_run(run.info.run_id).info.status == "RUNNING"
    again.step({**STEPS[2], "step": 4})
    again.close(failed=True)
    [same] = client.search_runs([client.get_experiment_by_name("kubetune").experiment_id])
    assert same.info.run_id == run.info.run_id and same.info.status == "FAILED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [1, 2, 3, 4]


def test_swanlab_offline_run_holds_every_scalar(tmp_path, monkeypatch):
    monkeypatch.setenv("SWANLAB_MODE", "offline")
    monkeypatch.setenv("SWANLAB_LOG_DIR", str(tmp_path / "swanlog"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    parsed, layout = job(tmp_path, ["swanlab"])
    [tracker] = tracking.build_trackers(parsed, layout, is_main=True)
    feed(tracker)

    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    [path] = glob.glob(str(tmp_path / "swanlog/run-*/run-*.swanlab"))
    reader = DataStoreReader()
    reader.open(path)
    got: dict[str, dict[int, float]] = {}
    kinds = {}
    for data in reader:
        record = Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        kinds[kind] = record
        if kind == "scalar":
            got.setdefault(record.scalar.key, {})[record.scalar.step] = record.scalar.value.number
    assert kinds["start"].start.project == "kubetune" and kinds["start"].start.name == "tracked"
    assert "state: RUN_STATE_FINISHED" in str(kinds["finish"])
    assert_same(got, expected())


def test_wandb_offline_run_holds_every_scalar_and_no_credential(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)  # what the Secret provides; never written anywhere
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    parsed, layout = job(tmp_path, ["wandb"])
    [tracker] = tracking.build_trackers(parsed, layout, is_main=True)
    feed(tracker)
    import wandb

    wandb.teardown()  # W&B's service may still be writing the run's file (at exit this happens by itself)

    from swanlab.converter.wb.wbdatastore import WBDataStoreReader  # W&B's transaction log format
    from wandb.proto.wandb_internal_pb2 import Record

    [path] = glob.glob(str(tmp_path / "wandb/offline-run-*/run-*.wandb"))
    assert tracking.run_id(parsed, layout) in path
    got: dict[str, dict[int, float]] = {}
    with WBDataStoreReader() as reader:
        reader.open(path)
        while (data := reader.scan()) is not None:
            record = Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                for key, value in items.items():
                    if key.startswith(("train/", "eval/")):
                        got.setdefault(key, {})[items["_step"]] = value
    assert_same(got, expected())
    for written in (tmp_path / "wandb").rglob("*"):
        if written.is_file():
            assert b"a" * 40 not in written.read_bytes(), written


def test_report_to_takes_each_known_tracker_once(tmp_path):
    from kubetune.api.spec import SpecError

    with pytest.raises(SpecError, match=r"spec.training.reportTo: training.reportTo lists wandb more than once"):
        job(tmp_path, ["wandb", "tensorboard", "wandb"])
    with pytest.raises(SpecError, match=r"spec.training.reportTo.0: Input should be 'tensorboard', 'swanlab', 'wandb' or 'mlflow' \(got 'comet'\)"):
        job(tmp_path, ["comet"])


@pytest.mark.slow
def test_kubetune_train_reports_what_it_logs_and_no_credential(tmp_path, tiny_model_dir, monkeypatch):
    """Rank 0 of a 2-process run sends TensorBoard and MLflow exactly the step and evaluation
    figures of metrics.jsonl; the tracker credential from the environment is written nowhere."""
    records = [{"prompt": f"What is {i} plus {i}?", "response": f"{2 * i}"} for i in range(24)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    doc = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "tracked"},
        "spec": {
            "model": {"uri": str(tiny_model_dir)}, "dataset": {"uri": "data.jsonl", "validation": {"ratio": 0.2}},
            "method": {"type": "lora", "lora": {"r": 4}}, "distributed": {"gpusPerNode": 2, "zero": {"stage": 2}},
            "training": {"maxSteps": 4, "microBatchSize": 2, "maxLength": 64, "logEverySteps": 1, "learningRate": 0.01,
                         "eval": {"everySteps": 2, "generate": True, "maxSamples": 2, "maxNewTokens": 3},
                         "reportTo": ["tensorboard", "mlflow"]},
        },
    }  # fmt: skip
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    token = "mlflow-token-never-written-0123456789"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KUBETUNE_METRICS_PORT": "0", "KUBETUNE_CACHE_DIR": str(tmp_path / "cache"),
           "MLFLOW_TRACKING_URI": f"file://{tmp_path}/mlruns", "MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_TRACKING_TOKEN": token}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "kubetune.train.main", "--job", str(tmp_path / "job.yaml")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    logged = [json.loads(line) for line in (tmp_path / "runs/tracked/output/metrics.jsonl").read_text().splitlines()]
    want: dict[str, dict[int, float]] = {}
    for record in logged:
        scalars = tracking.train_scalars(record) if record["event"] == "step" else tracking.eval_scalars(record)
        for tag, value in scalars.items():
            want.setdefault(tag, {})[record["step"]] = value
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second", "eval/validation_loss", "eval/rouge_l", "eval/bleu_4"} <= set(want)
    assert set(want["eval/validation_loss"]) == {2, 4} and set(want["train/loss"]) == {1, 2, 3, 4}
    folder = tmp_path / "runs/tracked/output/tensorboard"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1  # rank 0 only
    assert_same(tensorboard_scalars(folder), want)

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file://{tmp_path}/mlruns")
    [run] = client.search_runs([client.get_experiment_by_name("kubetune").experiment_id])
    assert run.info.status == "FINISHED"
    assert_same({tag: {m.step: m.value for m in client.get_metric_history(run.info.run_id, tag)} for tag in run.data.metrics}, want)

    assert token not in proc.stdout + proc.stderr
    for written in tmp_path.rglob("*"):
        if written.is_file() and "cache" not in written.parts:
            assert token.encode() not in written.read_bytes(), written
