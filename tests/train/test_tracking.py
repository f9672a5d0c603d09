"""Tracking: the default MLflow store read back through MLflow's client; TensorBoard event files
read by tensorboard's own reader; resume, failure and a missing backend."""

import json

import time
from pathlib import Path

import pytest

from tunesmith.config.load import build_config
from tunesmith.errors import ConfigError
from tunesmith.recipes.sft import run_sft
from tunesmith.tracking import read_tracking
from helpers import read_metrics, tiny_tree

mlflow = pytest.importorskip("mlflow", reason="mlflow is a core dependency; install the project")


def _tracked_tree(tiny_model_dir, chat_file, out, backends=None, **training):
    tree = tiny_tree(tiny_model_dir, chat_file, out, "lora", max_steps=4, eval_every=2, **training)
    tree["data"]["eval_fraction"] = 0.2
    tree["eval"] = {"samples": 2, "max_new_tokens": 4}
    del tree["tracking"]  # the default: MLflow in a SQLite store under output.dir
    if backends is not None:
        tree["tracking"] = {"backends": backends}
    return tree


def test_default_mlflow_run_reads_back_through_the_client(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "runs"
    run = run_sft(build_config(_tracked_tree(tiny_model_dir, chat_file, out, backends=["mlflow", "tensorboard"])))
    ids = read_tracking(run.run_dir)["mlflow"]
    assert ids["uri"] == f"sqlite:///{(out / 'mlflow.db').resolve()}" and (out / "mlflow.db").is_file()
    # mlflow.set_tracking_uri writes $MLFLOW_TRACKING_URI: undone, or the next run would log here too.
    import os

    assert "MLFLOW_TRACKING_URI" not in os.environ

    client = mlflow.MlflowClient(ids["uri"])
    logged = client.get_run(ids["run_id"])
    assert logged.info.status == "FINISHED" and logged.info.run_name == "tiny"
    params = logged.data.params
    assert params["training.lr"] == "0.005" and params["method.type"] == "lora" and params["training.max_steps"] == "4"
    assert params["system.torch"] and params["system.device"] == "cpu"
    assert logged.data.tags["tunesmith.run_dir"] == str(run.run_dir.resolve())

    records = read_metrics(run.run_dir)
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    history = client.get_metric_history(ids["run_id"], "loss")
    assert {m.step: m.value for m in history} == pytest.approx(losses)
    evals = [(m.step, m.value) for m in client.get_metric_history(ids["run_id"], "eval_loss")]
    assert [s for s, _ in evals] == [2, 4]
    assert logged.data.metrics["final/eval_loss"] == pytest.approx(run.result.final_eval_loss)

    artifacts = {a.path for a in client.list_artifacts(ids["run_id"])}
    assert {"config.yaml", "summary.json", "metrics.jsonl", "loss.svg", "samples"} <= artifacts
    samples = [a.path for a in client.list_artifacts(ids["run_id"], "samples")]
    assert samples == ["samples/step-000002.json", "samples/step-000004.json"]
    local = client.download_artifacts(ids["run_id"], "samples/step-000004.json", str(tmp_path))
    logged_samples = json.loads(open(local).read())
    assert logged_samples == next(r["samples"] for r in records if r.get("step") == 4 and "samples" in r)

    # TensorBoard: the same losses in event files that tensorboard's own reader loads.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("loss")} == pytest.approx(losses)
    assert "samples" in "".join(events.Tags()["tensors"])  # add_text is stored as a tensor summary


def test_resume_logs_into_the_same_mlflow_run(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tree = _tracked_tree(tiny_model_dir, chat_file, tmp_path / "runs", save_every=2)
    tree["eval"] = {"samples": 0}
    first = run_sft(build_config({**tree, "training": {**tree["training"], "max_steps": 3}}))
    run_id = read_tracking(first.run_dir)["mlflow"]["run_id"]
    (first.run_dir / "model").rename(tmp_path / "first-model")  # as if it had stopped after its step-2 checkpoint
    resumed = run_sft(build_config({**tree, "training": {**tree["training"], "max_steps": 4}}), resume=True)
    assert read_tracking(resumed.run_dir)["mlflow"]["run_id"] == run_id
    client = mlflow.MlflowClient(read_tracking(resumed.run_dir)["mlflow"]["uri"])
    history = client.get_metric_history(run_id, "loss")
    # Step 3 is trained (and logged) again from the checkpoint; MLflow keeps both points.
    assert sorted({m.step for m in history}) == [1, 2, 3, 4]
    last = [r["loss"] for r in read_metrics(resumed.run_dir) if r["step"] == 4 and "loss" in r]
    assert max(history, key=lambda m: (m.step, m.timestamp)).value == pytest.approx(last[0])
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_failed_training_marks_the_mlflow_run_failed(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from tunesmith.train import loop

    def explode(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(loop, "_train_step", explode)
    tree = _tracked_tree(tiny_model_dir, chat_file, tmp_path / "runs")
    with pytest.raises(RuntimeError, match="simulated"):
        run_sft(build_config(tree))
    ids = read_tracking(tmp_path / "runs" / "tiny")["mlflow"]
    assert mlflow.MlflowClient(ids["uri"]).get_run(ids["run_id"]).info.status == "FAILED"
    assert mlflow.active_run() is None  # the next run in this process starts clean


def test_a_backend_that_is_not_installed_is_refused_before_training(tiny_model_dir, chat_file, tmp_path,
                                                                      monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    tree = _tracked_tree(tiny_model_dir, chat_file, tmp_path / "runs", backends=["wandb"])
    with pytest.raises(ConfigError, match=r"tracking.backends: wandb is not installed: pip install wandb"):
        run_sft(build_config(tree))
    assert not (tmp_path / "runs").exists()


def test_backends_are_named_once():
    with pytest.raises(ConfigError, match="named twice"):
        build_config({"data": {"train": "x.jsonl"}, "tracking": {"backends": ["mlflow", "mlflow"]}})


def test_wandb_runs_offline_without_a_key_and_trackio_logs_locally(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is first imported
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    pytest.importorskip("wandb", reason="the tracking extra is not installed")
    pytest.importorskip("trackio", reason="the tracking extra is not installed")
    tree = _tracked_tree(tiny_model_dir, chat_file, tmp_path / "runs", backends=["wandb", "trackio"])
    started = time.time()
    run = run_sft(build_config(tree))
    ids = read_tracking(run.run_dir)
    assert set(ids) == {"wandb", "trackio"}
    offline = list((run.run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb")), "no offline W&B run file"
    # TRACKIO_DIR is read once, when trackio is first imported: another test in this process may have
    # imported it already (pytest-xdist mixes the files), so look where trackio writes.
    from trackio.utils import TRACKIO_DIR

    fresh = [p for p in Path(TRACKIO_DIR).rglob("*.db") if p.stat().st_mtime >= started - 1]
    assert fresh, f"trackio wrote no local database in {TRACKIO_DIR}"


def test_a_tracker_that_fails_is_switched_off_and_training_goes_on(tiny_model_dir, chat_file, tmp_path, monkeypatch,
                                                                    caplog):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from accelerate.tracking import MLflowTracker

    def refuse(self, values, step=None, **kwargs):
        raise ConnectionError("tracking server went away (simulated)")

    monkeypatch.setattr(MLflowTracker, "log", refuse)
    tree = _tracked_tree(tiny_model_dir, chat_file, tmp_path / "runs")
    tree["eval"] = {"samples": 0}
    run = run_sft(build_config(tree))
    assert run.result.state.global_step == 4 and (run.run_dir / "model").is_dir()
    assert [r["step"] for r in read_metrics(run.run_dir) if "loss" in r] == [1, 2, 3, 4]
    assert "mlflow failed to log metrics" in caplog.text and "switched off" in caplog.text
    ids = read_tracking(run.run_dir)["mlflow"]
    assert mlflow.MlflowClient(ids["uri"]).get_run(ids["run_id"]).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_a_tracker_that_fails_to_start_is_ended_and_the_error_goes_on(monkeypatch, tmp_path):
    """tracking.tracked: a start that raises (after it may have pointed MLflow at a store) still ends
    the trackers' runs and restores MLflow's URI; seen failing with the start outside the try."""
    from tunesmith import tracking

    ended = []
    monkeypatch.setattr(tracking, "start_tracking", lambda *a: (_ for _ in ()).throw(RuntimeError("no store")))
    monkeypatch.setattr(tracking, "fail_tracking", lambda accelerator, status: ended.append(status))
    with pytest.raises(RuntimeError, match="no store"):
        with tracking.tracked(None, tmp_path, None, resumed=False):
            pass
    assert ended == ["failed"]
