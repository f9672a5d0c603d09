"""The run folder's layout, and typed readers of it: the one module that knows where a run keeps what.

``runs/<name>/`` holds::

    config.yaml        the resolved config (written when the run starts)
    data.json          each data file the run read, with its SHA-256 when the run started
    metrics.jsonl      one record per logged step, eval and sample set
    checkpoints/       step-NNNNNNN/ folders (their inside is train.checkpoint's layout)
    model/             the final model: a PEFT adapter, a bottleneck adapter, or a full model folder
    value_head/        PPO's value head (value_head.safetensors)
    summary.json       results, versions and lineage (written when the run finishes)
    status.json        running, finished, preempted, failed or diverged, with the reason and step
    tracking.json      each tracker's ids for the run (MLflow run id and store...)
    eval-DATA/         tunesmith eval's eval.json and report.html
    harness/           tunesmith eval --harness's harness.json

Commands read runs through ``RunDir``; nothing else probes these names. The model folder's own
layout (which adapter kind it holds, and its base) is read here too, for run folders and for
adapter folders given on their own.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from tunesmith.config.schema import Config, parse_config, upgrade_saved_config
from tunesmith.errors import TunesmithError
from tunesmith.io import read_json

CONFIG_FILE = "config.yaml"
DATA_FILE = "data.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
VALUE_HEAD_DIR = "value_head"
VALUE_HEAD_FILE = "value_head.safetensors"
SUMMARY_FILE = "summary.json"
STATUS_FILE = "status.json"
BEST_DIR = "best"  # checkpoints/best/: the weights of the best eval loss (training.keep_best)
TRACKING_FILE = "tracking.json"
ROLLOUT_LOG = "vllm-rollouts.log"  # grpo.engine vllm: the output of the colocated vLLM server
EVAL_PREFIX = "eval-"
EVAL_FILE = "eval.json"
EVAL_REPORT = "report.html"
HARNESS_DIR = "harness"
HARNESS_FILE = "harness.json"

PEFT_ADAPTER_CONFIG = "adapter_config.json"  # peft's own name for an adapter folder's config
BOTTLENECK_CONFIG = "bottleneck_config.json"  # tunesmith's bottleneck adapters (adapters/bottleneck.py)

AdapterKind = Literal["peft", "bottleneck"]
RunStatus = Literal["running", "finished", "preempted", "failed", "diverged"]
STATUSES: tuple[str, ...] = ("running", "finished", "preempted", "failed", "diverged")


def adapter_kind(folder: Path) -> AdapterKind | None:
    """Which adapter a model folder holds: a PEFT adapter, a bottleneck adapter, or none (a full model)."""
    if (folder / BOTTLENECK_CONFIG).is_file():
        return "bottleneck"
    if (folder / PEFT_ADAPTER_CONFIG).is_file():
        return "peft"
    return None


def adapter_base(folder: Path) -> str:
    """The base model an adapter folder was trained on (as its config records it)."""
    kind = adapter_kind(folder)
    if kind is None:
        raise TunesmithError(f"{folder} is not an adapter folder ({PEFT_ADAPTER_CONFIG} or {BOTTLENECK_CONFIG})")
    record = read_json(folder / (BOTTLENECK_CONFIG if kind == "bottleneck" else PEFT_ADAPTER_CONFIG))
    if not isinstance(record, dict) or "base_model_name_or_path" not in record:
        raise TunesmithError(f"{folder}: its adapter config does not name base_model_name_or_path")
    return str(record["base_model_name_or_path"])


def is_run_dir(path: Path | str) -> bool:
    """A folder with a run's config.yaml (finished or not)."""
    return (Path(path).expanduser() / CONFIG_FILE).is_file()


@dataclass(frozen=True)
class RunDir:
    """A run folder: its paths, and typed readers of what it holds."""

    path: Path

    @classmethod
    def of(cls, config: Config) -> RunDir:
        """Where ``config``'s run lives: ``output.dir/<run name>``."""
        return cls(Path(config.output.dir) / config.run_name)

    @classmethod
    def existing(cls, path: Path | str) -> RunDir:
        """An existing run folder; an error that says what to do for anything else."""
        run = cls(Path(path).expanduser())
        if not run.config_file.is_file():
            raise TunesmithError(f"{run.path}: not a run folder (no {CONFIG_FILE}); `tunesmith runs list` lists them")
        return run

    # paths
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def data_file(self) -> Path:
        return self.path / DATA_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL_DIR

    @property
    def value_head_dir(self) -> Path:
        return self.path / VALUE_HEAD_DIR

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def tracking_file(self) -> Path:
        return self.path / TRACKING_FILE

    @property
    def status_file(self) -> Path:
        return self.path / STATUS_FILE

    @property
    def best_dir(self) -> Path:
        return self.checkpoints_dir / BEST_DIR

    def rollout_log(self, process: int = 0) -> Path:
        """vLLM's output when it samples a run's rollouts (one server per training process)."""
        return self.path / (ROLLOUT_LOG if process == 0 else ROLLOUT_LOG.replace(".log", f"-{process}.log"))

    def saved_config(self) -> dict[str, Any]:
        """config.yaml as the current config model reads it (an older run's other-task sections dropped)."""
        return upgrade_saved_config(self.raw_config())

    def eval_dir(self, data: Path | None) -> Path:
        """Where ``tunesmith eval`` of this run on ``data`` writes (the harness's folder without data)."""
        return self.path / (f"{EVAL_PREFIX}{data.stem}" if data is not None else HARNESS_DIR)

    # state
    @property
    def finished(self) -> bool:
        """The run wrote its final model and summary."""
        return self.model_dir.is_dir() and self.summary_file.is_file()

    @property
    def has_model(self) -> bool:
        return self.model_dir.is_dir()

    # readers
    def raw_config(self) -> dict[str, Any]:
        """config.yaml as saved (a run of an older tunesmith may no longer validate)."""
        try:
            tree = yaml.safe_load(self.config_file.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            raise TunesmithError(f"{self.config_file}: cannot be read as YAML ({err})") from None
        if not isinstance(tree, dict):
            raise TunesmithError(f"{self.config_file}: not a config (a mapping of sections), a {type(tree).__name__}")
        return tree

    def config(self) -> Config:
        """The run's validated config (one saved by an older tunesmith upgraded first)."""
        from pydantic import ValidationError

        try:
            return parse_config(self.saved_config())
        except ValidationError as err:
            from tunesmith.config.load import format_validation_error

            raise TunesmithError(f"{self.config_file}: no longer a valid config ("
                                 + "; ".join(format_validation_error(err)) + ")") from None

    def summary(self) -> dict[str, Any] | None:
        document = read_json(self.summary_file)
        return document if isinstance(document, dict) else None

    def metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl's records; a line cut short by a kill is skipped."""
        records = []
        if self.metrics_file.is_file():
            for line in self.metrics_file.read_text(encoding="utf-8").splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records

    def metrics_after(self, offset: int) -> tuple[list[dict[str, Any]], int]:
        """The records metrics.jsonl gained after byte ``offset``, and the offset to read on from, for a
        reader that follows a run as it trains. A line still being written waits for the next read; a file
        now shorter than ``offset`` (a resume rewinds it) is read again from its start."""
        try:
            if self.metrics_file.stat().st_size < offset:
                offset = 0
            with self.metrics_file.open("rb") as stream:
                stream.seek(offset)
                chunk = stream.read()
        except FileNotFoundError:
            return [], 0
        complete = chunk[:chunk.rfind(b"\n") + 1]
        records = []
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records, offset + len(complete)

    def status(self) -> dict[str, Any]:
        """status.json: ``status`` (running, finished, preempted, failed, diverged), with ``reason`` and
        ``step`` where it has them. A run marked running whose process has gone (on this machine) reads
        as failed: it was killed without a word (SIGKILL, the kernel's out-of-memory killer). A run
        folder from before status.json reads as finished or failed from what it holds."""
        record = read_json(self.status_file)
        if not isinstance(record, dict) or record.get("status") not in STATUSES:
            return {"status": "finished"} if self.finished else {
                "status": "failed", "reason": "it stopped before it finished (no status.json: an older tunesmith)"}
        if record["status"] == "running" and record.get("host") == socket.gethostname() \
                and not _alive(record.get("pid")):
            return {**record, "status": "failed", "reason": f"its process ({record.get('pid')}) ended without a "
                    "word: killed (SIGKILL or out of memory); resume it with --resume"}
        return record

    def data_lineage(self) -> list[dict[str, str]] | None:
        return read_json(self.data_file)

    def tracking(self) -> dict[str, Any]:
        return read_json(self.tracking_file) or {}

    def evaluations(self) -> dict[str, dict[str, Any]]:
        """Each evaluation written into the run folder: its folder's name -> eval.json or harness.json."""
        found = {}
        for document_file in sorted(self.path.glob(f"{EVAL_PREFIX}*/{EVAL_FILE}")) + sorted(
                self.path.glob(f"{HARNESS_DIR}*/{HARNESS_FILE}")):
            document = read_json(document_file)
            if isinstance(document, dict):
                found[document_file.parent.name] = document
        return found

    def started(self) -> float:
        """When the run started (its config's modification time)."""
        return self.config_file.stat().st_mtime

    def adapter_kind(self) -> AdapterKind | None:
        return adapter_kind(self.model_dir)

    def require_model(self) -> Path:
        """The final model folder; an error that says what to do when the run did not finish."""
        if not self.has_model:
            raise TunesmithError(f"{self.path} is a run folder without a final model ({MODEL_DIR}/): the run did "
                                 f"not finish; resume it with `tunesmith train CONFIG --resume`")
        return self.model_dir


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
