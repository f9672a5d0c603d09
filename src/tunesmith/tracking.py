"""Experiment tracking: metrics.jsonl always; MLflow (the default), TensorBoard, W&B and trackio
through accelerate's tracker classes.

MLflow's default store is a SQLite database beside the run folders (``output.dir/mlflow.db``, with
artifacts in ``output.dir/mlartifacts/``): a real tracking store that needs no server and that
``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`` shows. Each run logs its config (as
parameters and as config.yaml), system information, metrics per step, sample generations, its
final eval and summary. The ids of the tracked runs go to RUN/tracking.json, so that a resumed run
logs into the same MLflow run and ``tunesmith eval RUN`` and ``tunesmith registry add RUN`` find it.

Only the main process logs. Tracking never loses the training: a backend that fails while logging
is reported and switched off, and the run goes on (metrics.jsonl holds everything).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker

from tunesmith.config.schema import Config
from tunesmith.errors import ConfigError, RunStopped
from tunesmith.io import write_text_atomic
from tunesmith.quiet import known_prints_dropped
from tunesmith.rundir import RunDir
from tunesmith.runs import evaluation_values, flat_params

log = logging.getLogger(__name__)



def check_backends(config: Config) -> None:
    """Refuse, before anything loads, a backend whose package is not installed."""
    missing = [name for name in config.tracking.backends if importlib.util.find_spec(name) is None]  # module = package
    if missing:
        raise ConfigError([f"tracking.backends: {name} is not installed: pip install {name}, or take it "
                           f"out of tracking.backends ([] logs to metrics.jsonl only)" for name in missing])


def local_store_uri(folder: Path | str) -> str:
    """The SQLite MLflow store of a folder of runs.

    >>> local_store_uri("/tmp/runs")
    'sqlite:////tmp/runs/mlflow.db'
    """
    return f"sqlite:///{(Path(folder) / 'mlflow.db').resolve()}"


def mlflow_uri(config: Config) -> str:
    """tracking.mlflow_uri, else $MLFLOW_TRACKING_URI, else the SQLite store in output.dir."""
    return config.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or local_store_uri(config.output.dir)


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store; None for any other store."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store go beside the database (MLflow's own default is ./mlruns in
    whatever folder the command ran from); a server decides for itself."""
    database = sqlite_file(uri)
    return None if database is None else (database.parent / "mlartifacts").resolve().as_uri()


def system_info(device: torch.device) -> dict[str, str]:
    """Versions and the device: what a result depends on besides the config."""
    from importlib.metadata import PackageNotFoundError, version

    info = {"python": platform.python_version(), "platform": platform.platform(), "device": device.type,
            "cpu_count": str(os.cpu_count())}
    for package in ("tunesmith", "torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = "not installed"
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
    return info


def read_tracking(run_dir: Path) -> dict[str, Any]:
    """RUN/tracking.json: each backend's ids for this run ({} when the run was not tracked)."""
    return RunDir(Path(run_dir)).tracking()


_SAVED_URIS: list[tuple[str | None, str | None]] = []  # what mlflow pointed at before each tracked run


def _point_mlflow_at(uri: str) -> None:
    """Set MLflow's global tracking URI for this run (accelerate's tracker logs through the global
    API), remembering what it was: mlflow.set_tracking_uri also writes $MLFLOW_TRACKING_URI, which
    would send the next run in this process (and the registry) to this run's store."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    _SAVED_URIS.append((getattr(utils, "_tracking_uri", None), os.environ.get("MLFLOW_TRACKING_URI")))
    mlflow.set_tracking_uri(uri)


def _restore_mlflow_uri() -> None:
    if not _SAVED_URIS:
        return
    import mlflow

    before, environment = _SAVED_URIS[0]
    _SAVED_URIS.clear()
    mlflow.set_tracking_uri(before)  # None unsets the variable as well
    if environment is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = environment


def _mlflow_tracker(config: Config, run_dir: Path, previous: dict[str, Any]) -> GeneralTracker:
    import mlflow
    from accelerate.tracking import MLflowTracker

    uri = mlflow_uri(config)
    _point_mlflow_at(uri)
    run_id = previous.get("run_id") if previous.get("uri") == uri else None
    if run_id is not None:
        try:
            alive = mlflow.MlflowClient(uri).get_run(run_id).info.lifecycle_stage == "active"
        except mlflow.exceptions.MlflowException:
            alive = False
        if not alive:
            log.warning("MLflow run %s is not in %s any more (or was deleted): logging to a new run", run_id, uri)
            run_id = None
    tags = {"tunesmith.run_dir": str(run_dir.resolve()), "tunesmith.task": config.task,
            "tunesmith.method": config.method.type, "tunesmith.model": config.model.name_or_path}
    return MLflowTracker(experiment_name=config.tracking.project, logging_dir=artifact_location(uri), run_id=run_id,
                         tags=tags, run_name=config.run_name, nested_run=mlflow.active_run() is not None)


def _make_tracker(name: str, config: Config, run_dir: Path, previous: dict[str, Any]) -> GeneralTracker:
    from accelerate import tracking

    if name == "mlflow":
        return _mlflow_tracker(config, run_dir, previous)
    if name == "tensorboard":  # RUN/tensorboard/: `tensorboard --logdir runs` shows every run
        return tracking.TensorBoardTracker("tensorboard", run_dir)
    if name == "wandb":
        offline = not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ
        if offline:
            log.info("wandb: no WANDB_API_KEY, so the run is logged offline to %s (wandb sync uploads it)",
                     run_dir / "wandb")
        return tracking.WandBTracker(config.tracking.project, name=config.run_name, dir=str(run_dir),
                                     id=previous.get("id"), resume="allow", **({"mode": "offline"} if offline else {}))
    return tracking.TrackioTracker(config.tracking.project, name=config.run_name)


def start_tracking(config: Config, run_dir: Path, accelerator: Accelerator, resumed: bool) -> None:
    """Start the configured trackers (main process) as ``accelerator.trackers`` and log the config,
    system information and config.yaml. A resumed run logs into the run it started."""
    if not config.tracking.backends or not accelerator.is_main_process:
        return
    previous = read_tracking(run_dir) if resumed else {}
    accelerator.log_with = [_make_tracker(name, config, run_dir, previous.get(name, {}))
                            for name in config.tracking.backends]
    accelerator.trackers = []
    with known_prints_dropped():  # trackio's and W&B's announcements (shown with -v)
        accelerator.init_trackers(config.tracking.project)  # starts each tracker
    ids: dict[str, Any] = {}
    for tracker in accelerator.trackers:
        # Parameters once per tracked run: MLflow refuses to change them when a run resumes.
        if tracker.name == "mlflow":
            first = tracker.tracker.info.run_id != previous.get("mlflow", {}).get("run_id")
        else:
            first = not previous.get(tracker.name)
        if first:
            tracker.store_init_configuration({**flat_params(config.model_dump(mode="json")),
                                              **{f"system.{k}": v for k, v in system_info(accelerator.device).items()}})
        if tracker.name == "mlflow":
            import mlflow

            run = tracker.tracker
            ids["mlflow"] = {"uri": mlflow.get_tracking_uri(), "run_id": run.info.run_id,
                             "experiment_id": run.info.experiment_id}
            mlflow.log_artifact(str(RunDir(run_dir).config_file))
            log.info("mlflow: run %s in %s (mlflow ui --backend-store-uri %s)", run.info.run_id,
                     ids["mlflow"]["uri"], ids["mlflow"]["uri"])
        elif tracker.name == "wandb":
            ids["wandb"] = {"id": tracker.run.id, "dir": str(run_dir / "wandb")}
        elif tracker.name == "tensorboard":
            ids["tensorboard"] = {"dir": str(run_dir / "tensorboard")}
        else:
            ids[tracker.name] = {"project": config.tracking.project, "name": config.run_name}
    write_text_atomic(RunDir(run_dir).tracking_file, json.dumps(ids, indent=2) + "\n")


@contextmanager
def tracked(config: Config, run_dir: Path, accelerator: Accelerator, resumed: bool) -> Iterator[None]:
    """The trackers' whole life around a recipe's training and final save, entered by the recipe:
    started on entry (main process; a resumed run logs into the run it started); the recipe's
    ``finish_run`` ends them with the final numbers; an error inside ends their runs as FAILED
    (KILLED when preempted or on Ctrl-C) and goes on up, as does a tracker that fails to start (its run is ended and
    MLflow's URI restored)."""
    try:
        start_tracking(config, run_dir, accelerator, resumed)
        yield
    except BaseException as err:
        fail_tracking(accelerator, ended_as(err))
        raise


def ended_as(err: BaseException) -> str:
    """The run status an exception leaves: preempted (a stop signal, Ctrl-C), diverged, or failed."""
    if isinstance(err, RunStopped):
        return err.status
    return "preempted" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "failed"


def _mlflow_status(status: str) -> str:
    """MLflow's name for how a run ended: a preempted run was KILLED, a failed or diverged one FAILED."""
    return {"finished": "FINISHED", "preempted": "KILLED"}.get(status, "FAILED")


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


def _end_run(tracker: GeneralTracker, status: str) -> None:
    """End one tracker's run that did not finish (``status``: preempted, failed, diverged): MLflow as KILLED
    or FAILED with the tag ``tunesmith.status``, W&B with exit code 1."""
    if tracker.name == "mlflow":
        import mlflow

        mlflow.set_tag("tunesmith.status", status)
        mlflow.end_run(status=_mlflow_status(status))
    elif tracker.name == "wandb":
        tracker.run.finish(exit_code=1)
    else:
        _finish(tracker)


def _finish(tracker: GeneralTracker) -> None:
    """End a tracker's run without its announcements; trackio's through trackio.finish(), which also
    forgets the run (accelerate's tracker.finish() leaves it current, and trackio's atexit hook then
    finishes it again at exit, printing "Run finished" a second time)."""
    with known_prints_dropped():
        if tracker.name == "trackio":
            import trackio

            trackio.finish()
        else:
            tracker.finish()


def _guarded(accelerator: Accelerator, tracker: GeneralTracker, what: str, action: Any) -> None:
    """Run one tracker's logging call; a failure switches that tracker off (its run ends as failed),
    never the training."""
    try:
        action()
    except Exception as err:  # noqa: BLE001 - any backend error: metrics.jsonl still has the record
        log.warning("tracking: %s failed to log %s (%s: %s); it is switched off for this run, metrics.jsonl "
                    "has everything", tracker.name, what, type(err).__name__, err)
        accelerator.trackers = [t for t in accelerator.trackers if t is not tracker]
        try:
            _end_run(tracker, "failed")
        except Exception as end_err:  # noqa: BLE001 - the backend is already reported as broken
            log.debug("tracking: %s also failed to end its run (%s)", tracker.name, end_err)


def samples_markdown(samples: list[dict[str, str]]) -> str:
    """Sample generations as Markdown (TensorBoard's text panel renders it)."""
    return "\n\n---\n\n".join(f"**prompt**\n\n```\n{s['prompt']}\n```\n\n**reply**\n\n```\n{s['reply']}\n```"
                              for s in samples)


def log_record(accelerator: Accelerator, record: dict[str, Any]) -> None:
    """One metrics.jsonl record to every tracker: its numbers at its step, or its sample generations."""
    step, values = record.get("step"), _numbers(record)
    for tracker in list(accelerator.trackers):
        if "samples" in record:
            _guarded(accelerator, tracker, "samples", lambda t=tracker: _log_samples(t, step, record["samples"]))
        elif values:
            _guarded(accelerator, tracker, "metrics", lambda t=tracker: t.log(values, step=step))


def _log_samples(tracker: GeneralTracker, step: int, samples: list[dict[str, str]]) -> None:
    if tracker.name == "mlflow":
        import mlflow

        mlflow.log_text(json.dumps(samples, indent=1, ensure_ascii=False), f"samples/step-{step:06d}.json")
    elif tracker.name == "tensorboard":
        tracker.writer.add_text("samples", samples_markdown(samples), step)
    elif tracker.name == "wandb":
        tracker.log_table("samples", columns=["prompt", "reply"], data=[[s["prompt"], s["reply"]] for s in samples],
                          step=step)
    else:  # trackio: text as a one-column table is not worth a dataframe dependency; metrics.jsonl has them
        return


def loss_curve_svg(records: list[dict[str, Any]]) -> str:
    """The train and eval loss of a run's metrics records as an SVG line chart."""
    from tunesmith.plots import line_chart

    series = {name: [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
              for name, key in (("train loss", "loss"), ("eval loss", "eval_loss"))}
    return line_chart("loss", {k: v for k, v in series.items() if v})


def finish_tracking(accelerator: Accelerator, run_dir: Path, summary: dict[str, Any]) -> None:
    """The final numbers (final train/eval loss and eval metrics, tokens, seconds, memory) and the
    run's files as artifacts; then each tracker ends its run."""
    if not accelerator.trackers:
        return
    final = {("final/" + key[len("final_"):] if key.startswith("final_") else key): value
             for key, value in summary.items()
             if key.startswith("final_") or key in ("tokens_seen", "train_seconds", "peak_memory_mb")}
    step, values = summary.get("steps"), _numbers(final)
    for tracker in list(accelerator.trackers):
        _guarded(accelerator, tracker, "the final numbers", lambda t=tracker: t.log(values, step=step))
        if tracker.name == "mlflow" and tracker in accelerator.trackers:  # a switched-off tracker has no run
            _guarded(accelerator, tracker, "the run's files", lambda: _mlflow_files(run_dir))
    status = summary.get("status", "finished")
    for tracker in accelerator.trackers:
        try:
            if status == "finished":
                if tracker.name == "mlflow":
                    import mlflow

                    mlflow.set_tag("tunesmith.status", status)
                _finish(tracker)
            else:  # a diverged run: its model is the last good checkpoint's, and the run did not succeed
                _end_run(tracker, status)
        except Exception as err:  # noqa: BLE001 - the run folder is complete; only the tracker's end is lost
            log.warning("tracking: %s failed to finish (%s)", tracker.name, err)
    accelerator.trackers = []
    _restore_mlflow_uri()


def _mlflow_files(run_dir: Path) -> None:
    import mlflow

    run = RunDir(run_dir)
    for path in (run.summary_file, run.metrics_file):
        if path.is_file():
            mlflow.log_artifact(str(path))
    records = run.metrics()
    mlflow.log_text(loss_curve_svg(records), "loss.svg")


def fail_tracking(accelerator: Accelerator, status: str) -> None:
    """End the trackers' runs of a training that raised (``status``: preempted, failed or diverged): MLflow
    marks its run KILLED (preempted) or FAILED, W&B exits with code 1."""
    for tracker in accelerator.trackers:
        try:
            _end_run(tracker, status)
        except Exception as err:  # noqa: BLE001 - the training's own error is the one to report
            log.warning("tracking: %s failed to end its run (%s)", tracker.name, err)
    accelerator.trackers = []
    _restore_mlflow_uri()


def log_evaluation(run_dir: Path, document: dict[str, Any], files: list[Path], name: str) -> bool:
    """Add an evaluation of a tracked run to its MLflow run: the document's numbers as ``NAME/...``
    metrics (at step 0: ``eval/DATA/loss``, ``harness/TASK/METRIC``) and ``files`` as artifacts under
    ``NAME``. Returns whether it was logged."""
    ids = read_tracking(run_dir).get("mlflow")
    if not ids or importlib.util.find_spec("mlflow") is None:
        return False
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(f"{name}/{key}", value, now, 0) for key, value in evaluation_values(document).items()]
    try:
        client = MlflowClient(ids["uri"])
        client.log_batch(ids["run_id"], metrics=metrics)
        for path in files:
            if path.is_file():
                client.log_artifact(ids["run_id"], str(path), name)
    except Exception as err:  # noqa: BLE001 - the files are written; only their copy in MLflow is missing
        log.warning("mlflow: the evaluation was not logged to run %s (%s: %s)", ids["run_id"], type(err).__name__,
                    err)
        return False
    log.info("mlflow: logged the evaluation to run %s", ids["run_id"])
    return True
