"""A model registry on MLflow's: `tunesmith registry add | list | promote`, and `registry:NAME@ALIAS`
wherever a model is named (chat, serve, eval, export).

``registry add RUN --name NAME`` copies the run's model folder, config.yaml, summary.json and
evaluations into the artifacts of the run's MLflow run (an MLflow run is made for an untracked
run), so that a version never changes under its number, even if the run folder is trained again
or deleted. The version carries its lineage as tags: the base model, each data file with the
SHA-256 it had when training read it, the task and method, the evaluation metrics and the
tunesmith version.

The registry's store: ``--registry-uri``, else $MLFLOW_TRACKING_URI, else ``runs/mlflow.db`` (the
store that training logs to by default).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from tunesmith import __version__
from tunesmith.config.schema import Config
from tunesmith.errors import TunesmithError
from tunesmith.io import sha256_of
from tunesmith.runs import RunInfo, flat_params, read_run
from tunesmith.tracking import artifact_location, local_store_uri, read_tracking, sqlite_file

log = logging.getLogger(__name__)

PREFIX = "registry:"
ARTIFACT_DIR = "registered"  # in the MLflow run: a run-folder layout (config.yaml, model/, summary.json...)
NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
SPEC = re.compile(rf"^registry:(?P<name>{NAME})(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))?$")


def registry_uri(explicit: str | None = None) -> str:
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or local_store_uri("runs")


def _client(uri: str, must_exist: bool = True) -> Any:
    from mlflow import MlflowClient

    database = sqlite_file(uri)
    if must_exist and database is not None and not database.is_file():
        raise TunesmithError(f"no model registry at {uri}: register a run first (tunesmith registry add RUN --name "
                             f"NAME), or point MLFLOW_TRACKING_URI at the store (the registry commands also take --registry-uri)")
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _config_of(run: RunInfo) -> Config:
    if run.config is None:
        raise TunesmithError(f"{run.path}: its config cannot be read ({run.problem})")
    return run.config


def _lineage(run: RunInfo) -> dict[str, str]:
    """The version's tags: base model, data files with their SHA-256 at training time, evaluations."""
    config, summary = _config_of(run), run.summary or {}
    tags = {"tunesmith.version": __version__, "run_dir": str(run.path.resolve()), "run_name": run.name,
            "task": config.task, "method": config.method.type, "base_model": config.model.name_or_path}
    recorded = summary.get("data")
    if recorded is None:  # a run from before summaries held the data's hashes: hash the files as they are now
        recorded = [{"role": "train", "path": d.path, "sha256": sha256_of(Path(d.path)) + " (at registration)"}
                    for d in config.data.train if Path(d.path).is_file()]
    for index, entry in enumerate(recorded):
        prefix = f"data.{entry['role']}.{index}"
        tags[f"{prefix}.path"], tags[f"{prefix}.sha256"] = entry["path"], entry["sha256"]
        path = Path(entry["path"])
        if path.is_file() and not entry["sha256"].endswith("(at registration)") and sha256_of(path) != entry["sha256"]:
            log.warning("%s has changed since the run trained on it: the version records the SHA-256 it had then",
                        path)
    for key in ("final_train_loss", "final_eval_loss", "steps"):
        if summary.get(key) is not None:
            tags[f"train.{key}"] = str(summary[key])
    for key, value in run.eval_metrics().items():
        tags[f"eval.{key}"] = str(value)
    return tags


def _mlflow_run_for(run: RunInfo, client: Any, uri: str) -> str:
    """The run's own MLflow run when it was tracked in this store; else a new one holding its config
    and results (so that every version has a run to point to)."""
    ids = read_tracking(run.path).get("mlflow", {})
    if ids.get("uri") == uri:
        try:
            client.get_run(ids["run_id"])
            return ids["run_id"]
        except Exception:  # noqa: BLE001 - deleted from the store: make a new one below
            log.warning("MLflow run %s is not in %s any more: registering through a new run", ids["run_id"], uri)
    project = _config_of(run).tracking.project
    experiment = client.get_experiment_by_name(project)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(
        project, artifact_location=artifact_location(uri))
    mlflow_run = client.create_run(experiment_id, run_name=run.name, tags={"tunesmith.run_dir": str(run.path.resolve())})
    run_id = mlflow_run.info.run_id
    from mlflow.entities import Metric, Param

    params = [Param(k, str(v)[:6000]) for k, v in flat_params(run.settings).items()]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start:start + 100])
    metrics = [Metric(k, float(v), 0, run.value("steps") or 0) for k, v in (run.summary or {}).items()
               if k.startswith("final_") and isinstance(v, (int, float)) and not isinstance(v, bool)]
    if metrics:
        client.log_batch(run_id, metrics=metrics)
    client.set_terminated(run_id)
    return run_id


def add(run_dir: Path | str, name: str, alias: str | None = None, uri: str | None = None,
        description: str | None = None) -> tuple[Any, str]:
    """Register a finished run as a new version of ``name`` (created if new); return the ModelVersion
    and the store it went to: ``uri``, else the store the run was tracked in, else $MLFLOW_TRACKING_URI,
    else the SQLite store beside the run folder."""
    from mlflow.exceptions import MlflowException

    check_alias(alias)
    run = read_run(run_dir)
    if not run.finished:
        raise TunesmithError(f"{run.path} has no final model ({run.status}): only a finished run can be registered")
    if run.state["status"] != "finished":  # a diverged run's model is its last good weights, not a result
        raise TunesmithError(f"{run.path} is {run.status}: only a finished run can be registered "
                             f"({run.state.get('reason')})")
    _config_of(run)  # a config that no longer reads: refused before anything goes to the store
    if not re.fullmatch(NAME, name):
        raise TunesmithError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (it is written NAME@ALIAS)")
    tracked = read_tracking(run.path).get("mlflow", {})
    uri = uri or tracked.get("uri") or os.environ.get("MLFLOW_TRACKING_URI") or local_store_uri(run.path.parent)
    client = _client(uri, must_exist=False)
    run_id = _mlflow_run_for(run, client, uri)
    # Each registration gets its own artifact folder: the same MLflow run may be registered again
    # (after a resume, a new evaluation, or under another name) without touching earlier versions.
    artifact_dir = f"{ARTIFACT_DIR}/{uuid.uuid4().hex[:12]}"
    folder = run.run
    for item in (folder.config_file, folder.summary_file, folder.metrics_file, folder.data_file):
        if item.is_file():
            client.log_artifact(run_id, str(item), artifact_dir)
    client.log_artifacts(run_id, str(folder.model_dir), f"{artifact_dir}/{folder.model_dir.name}")
    for evaluation in run.evals:
        client.log_artifacts(run_id, str(run.path / evaluation), f"{artifact_dir}/{evaluation}")
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_dir}"
    try:
        client.create_registered_model(name, description=f"registered with tunesmith from {run.name}")
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    version = client.create_model_version(name, source, run_id=run_id, tags=_lineage(run),
                                          description=description or f"{run.name}: {_config_of(run).task} "
                                          f"({_config_of(run).method.type}) on {_config_of(run).model.name_or_path}")
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return version, uri


def check_alias(alias: str | None) -> None:
    """MLflow reserves ``latest`` and ``v<N>``; tunesmith's ``NAME@ALIAS`` needs a plain word.

    >>> check_alias("production")
    >>> check_alias("v2")
    Traceback (most recent call last):
    ...
    tunesmith.errors.TunesmithError: alias 'v2': MLflow reserves 'latest' and 'v<number>'; choose another
    """
    if alias is None:
        return
    if not re.fullmatch(r"[A-Za-z0-9_-]+", alias):
        raise TunesmithError(f"alias {alias!r}: use letters, digits, '_' and '-' (it is written NAME@ALIAS)")
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise TunesmithError(f"alias {alias!r}: MLflow reserves 'latest' and 'v<number>'; choose another")


def promote(name: str, version: str, alias: str, uri: str | None = None) -> str | None:
    """Point ``alias`` at ``version``; return the version it pointed at before (None if new)."""
    from mlflow.exceptions import MlflowException

    check_alias(alias)
    client = _client(registry_uri(uri))
    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise TunesmithError(f"registry: {name} has no version {version} (tunesmith registry list)") from None
    try:
        before = client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        before = None
    client.set_registered_model_alias(name, alias, str(version))
    return before


def versions(uri: str | None = None) -> list[dict[str, Any]]:
    """Every version of every registered model: name, version, aliases, run, lineage and evaluations."""
    client = _client(registry_uri(uri))
    rows = []
    for model in client.search_registered_models():
        aliases: dict[str, list[str]] = {}
        for alias, number in (model.aliases or {}).items():
            aliases.setdefault(str(number), []).append(alias)
        for version in client.search_model_versions(f"name = '{model.name}'"):
            rows.append({"name": model.name, "version": int(version.version),
                         "aliases": sorted(aliases.get(str(version.version), [])), "tags": dict(version.tags),
                         "created": version.creation_timestamp, "source": version.source, "run_id": version.run_id})
    return sorted(rows, key=lambda r: (r["name"], -r["version"]))


def resolve(spec: str, uri: str | None = None) -> Path:
    """``registry:NAME@ALIAS``, ``registry:NAME/VERSION`` or ``registry:NAME`` (the newest version) -> a
    local folder laid out as a run folder (config.yaml, model/, summary.json)."""
    from mlflow.exceptions import MlflowException

    match = SPEC.match(spec)
    if not match:
        raise TunesmithError(f"{spec}: write registry:NAME@ALIAS, registry:NAME/VERSION or registry:NAME")
    name, alias, number = match.group("name"), match.group("alias"), match.group("version")
    client = _client(registry_uri(uri))
    try:
        if alias:
            version = client.get_model_version_by_alias(name, alias)
        elif number:
            version = client.get_model_version(name, number)
        else:
            found = client.search_model_versions(f"name = '{name}'")
            if not found:
                raise TunesmithError(f"{spec}: no registered model {name!r} (tunesmith registry list)")
            version = max(found, key=lambda v: int(v.version))
    except MlflowException as err:
        raise TunesmithError(f"{spec}: not in the registry at {registry_uri(uri)} ({err.message})") from None
    log.info("%s is %s version %s (run %s)", spec, name, version.version, version.run_id)
    return _local_copy(version.source, name, version.version)


def _local_copy(source: str, name: str, version: str) -> Path:
    """A local artifact store is read in place; anything else is downloaded once into the cache."""
    if source.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(source).path))
    if Path(source).is_dir():
        return Path(source)
    import mlflow.artifacts

    key = hashlib.sha256(source.encode()).hexdigest()[:16]  # one folder per artifact location, any store
    cache = Path(os.environ.get("TUNESMITH_CACHE", Path.home() / ".cache" / "tunesmith")) / "registry" / key
    if not (cache / "complete").is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache.parent))
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(staging))
            (staging / "complete").write_text(f"{name}/{version} from {source}\n")
            shutil.rmtree(cache, ignore_errors=True)
            os.replace(staging, cache)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return cache / Path(source.rstrip("/")).name


def version_lines(rows: list[dict[str, Any]]) -> list[list[str]]:
    """`registry list` as table rows: the lineage and evaluation tags, shortened."""
    import time

    table = [["name", "version", "aliases", "run", "task", "method", "base model", "created", "evaluations"]]
    for row in rows:
        tags = row["tags"]
        evals = ", ".join(f"{k[len('eval.'):]}={float(v):.4g}" for k, v in sorted(tags.items())
                          if k.startswith("eval.") and _is_number(v))
        table.append([row["name"], str(row["version"]), ",".join(row["aliases"]) or "–", tags.get("run_name", "?"),
                      tags.get("task", "?"), tags.get("method", "?"), tags.get("base_model", "?"),
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(row["created"] / 1000)), evals or "–"])
    return table


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False

