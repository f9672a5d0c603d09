"""What is in the run folders, without loading a model: `tunesmith runs list | show | compare`.

Run folders are read through ``tunesmith.rundir`` (config, metrics, summary, evaluations, trackers'
ids); nothing here loads a model, so it is quick and works while a run is still training.
"""

from __future__ import annotations

import html
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.config.schema import Config
from tunesmith.errors import TunesmithError
from tunesmith.io import write_text_atomic
from tunesmith.plots import line_chart
from tunesmith.rundir import RunDir, is_run_dir

SPARKS = "▁▂▃▄▅▆▇█"


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """A nested config as dotted keys with values every tracker accepts (lists as JSON, None as "null").

    >>> flat_params({"training": {"lr": 0.1, "betas": [0.9, 0.99]}, "name": None})
    {'training.lr': 0.1, 'training.betas': '[0.9, 0.99]', 'name': 'null'}
    """
    flat: dict[str, str | int | float | bool] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{prefix}{key}."))
        elif value is None or isinstance(value, list):
            flat[f"{prefix}{key}"] = json.dumps(value)
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def evaluation_values(document: dict[str, Any]) -> dict[str, float]:
    """The numbers of an eval.json (``NAME``, and ``delta/NAME`` against the compared model) or a
    harness.json (``TASK/METRIC``, ``/FILTER`` appended unless it is ``none``).

    >>> evaluation_values({"metrics": {"loss": {"value": 1.5}}, "compare": {"delta": {"loss": {"value": -0.5}}}})
    {'loss': 1.5, 'delta/loss': -0.5}
    >>> evaluation_values({"results": {"gsm8k": {"exact_match,strict": 0.25, "exact_match_stderr,strict": 0.1}}})
    {'gsm8k/exact_match/strict': 0.25}
    """
    values = {name: entry.get("value") for name, entry in document.get("metrics", {}).items()}
    values.update({f"delta/{name}": entry.get("value")
                   for name, entry in document.get("compare", {}).get("delta", {}).items()})
    for task, entries in document.get("results", {}).items():
        for key, value in entries.items():
            if "," in key and "_stderr" not in key:
                metric, flt = key.split(",", 1)  # a task may score one metric under several filters
                values[f"{task}/{metric}" + ("" if flt == "none" else f"/{flt}")] = value
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass
class RunInfo:
    run: RunDir
    config: Config | None  # None: the saved config no longer validates (``problem`` says why)
    summary: dict[str, Any] | None
    records: list[dict[str, Any]] = field(default_factory=list)
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # eval folder -> eval.json or harness.json
    problem: str | None = None

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def name(self) -> str:
        return self.run.name

    @property
    def finished(self) -> bool:
        return self.summary is not None and self.run.has_model

    @property
    def settings(self) -> dict[str, Any]:
        """The config as plain values, every default filled in (as saved, where it no longer validates)."""
        return self.config.model_dump(mode="json") if self.config is not None else self.run.raw_config()

    @property
    def state(self) -> dict[str, Any]:
        """status.json as ``RunDir.status`` reads it: status, reason, step."""
        return self.run.status()

    @property
    def status(self) -> str:
        """running, finished, preempted, failed or diverged; with the step where the run is or stopped."""
        record = self.state
        step = record.get("step") or self.last_step
        if record["status"] == "finished" or not step:
            return record["status"]
        return f"{record['status']} (step {step})"

    @property
    def last_step(self) -> int:
        return max((r.get("step", 0) for r in self.records), default=0)

    def curve(self, key: str) -> list[tuple[float, float]]:
        """(step, value) of one metric over the run; a step trained again after a resume counts once (the last)."""
        points = {r["step"]: r[key] for r in self.records if isinstance(r.get(key), (int, float)) and "step" in r}
        return sorted(points.items())

    def value(self, key: str) -> Any:
        """A summary field, falling back to the last logged value (a run still training has no summary)."""
        if self.summary is not None and self.summary.get(key) is not None:
            return self.summary[key]
        fallback = {"final_train_loss": "loss", "final_eval_loss": "eval_loss"}.get(key)
        if fallback:
            curve = self.curve(fallback)
            return curve[-1][1] if curve else None
        if key == "steps":
            return self.last_step
        return None

    def eval_metrics(self) -> dict[str, float]:
        """``EVALFOLDER/METRIC`` -> value for every evaluation written into the run folder."""
        return {f"{folder}/{key}": value for folder, document in self.evals.items()
                for key, value in evaluation_values(document).items()}


def read_run(path: Path | str) -> RunInfo:
    run = RunDir.existing(path)
    config, problem = None, None
    try:
        config = run.config()
    except TunesmithError as err:
        problem = str(err)
    return RunInfo(run, config, run.summary(), run.metrics(), run.evaluations(), problem)


def find_runs(folder: Path | str) -> list[RunInfo]:
    """The run folders directly under ``folder``, newest first."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise TunesmithError(f"{folder}: no such folder of runs (train one with `tunesmith train CONFIG`, or pass "
                             f"--dir)")
    runs = [read_run(p) for p in folder.iterdir() if is_run_dir(p)]
    return sorted(runs, key=lambda r: r.run.started(), reverse=True)


def _number(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "–"
    minutes, second = divmod(int(seconds), 60)
    hours, minute = divmod(minutes, 60)
    return f"{hours}h{minute:02d}m" if hours else f"{minute}m{second:02d}s"


def table(rows: list[list[str]], numbers_right: bool = False) -> str:
    """Columns padded to their widest cell; the first row is the header, underlined. ``numbers_right``: a
    column whose every cell below the header is a number (``1,024``, ``2.5``, ``12%``, ``0.05s``) is
    aligned to the right.

    >>> print(table([["run", "loss"], ["a", "1.5"]]))
    run  loss
    ---  ----
    a    1.5
    >>> print(table([["part", "GiB"], ["weights", "1.00"], ["activations", "12.50"]], numbers_right=True))
    part           GiB
    -----------  -----
    weights       1.00
    activations  12.50
    """
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = [numbers_right and all(re.match(r"^[-+]?[0-9.,]+[a-z%]*$", row[i]) for row in rows[1:])
             for i in range(len(widths))]
    lines = ["  ".join(cell.rjust(width) if flush else cell.ljust(width)
                       for cell, width, flush in zip(row, widths, right)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def sparkline(values: list[float], width: int = 40) -> str:
    """A loss curve in one line of block characters (the last ``width`` buckets' means).

    >>> sparkline([4.0, 3.0, 2.0, 1.0])
    '█▆▃▁'
    """
    if not values:
        return ""
    size = max(1, -(-len(values) // width))
    means = [sum(values[i:i + size]) / len(values[i:i + size]) for i in range(0, len(values), size)]
    low, high = min(means), max(means)
    span = (high - low) or 1.0
    return "".join(SPARKS[round((v - low) / span * (len(SPARKS) - 1))] for v in means)


def _method(config: Config | None) -> str:
    if config is None:
        return "?"
    kind = config.method.type
    return f"{kind} r{config.method.lora.r}" if kind in ("lora", "qlora", "dora") else kind


def list_table(runs: list[RunInfo]) -> str:
    rows = [["run", "task", "method", "model", "steps", "train loss", "eval loss", "tokens", "time", "status",
             "started"]]
    for run in runs:
        model = run.config.model.name_or_path if run.config is not None else "?"
        rows.append([run.name, run.config.task if run.config is not None else "?", _method(run.config),
                     model if len(model) <= 28 else "…" + model[-27:], _number(run.value("steps")),
                     _number(run.value("final_train_loss")), _number(run.value("final_eval_loss")),
                     _number((run.summary or {}).get("tokens_seen")), _duration((run.summary or {}).get("train_seconds")),
                     run.status, time.strftime("%Y-%m-%d %H:%M", time.localtime(run.run.started()))])
    return table(rows)


def show_text(run: RunInfo) -> str:
    config, summary = run.config, run.summary or {}
    lines = [f"run        {run.path}  ({run.status})"]
    if run.state.get("reason") and run.state["status"] != "running":
        lines.append(f"status     {run.state['reason']}")
    if config is None:
        lines.append(f"config     {run.problem}")
    else:
        training = config.training
        lines += [f"task       {config.task}, {_method(config)} on {config.model.name_or_path}",
                  "data       " + ", ".join(d.path for d in config.data.train),
                  f"training   lr {training.lr}, batch {training.batch_size} x {training.grad_accum}, max_steps "
                  f"{training.max_steps}, seed {training.seed}"]
    if summary:
        lines.append(f"result     {_number(summary.get('steps'))} steps, {_number(summary.get('tokens_seen'))} tokens, "
                     f"{_duration(summary.get('train_seconds'))}, peak {_number(summary.get('peak_memory_mb'))} MB")
    for label, key in (("train loss", "loss"), ("eval loss", "eval_loss")):
        curve = run.curve(key)
        if curve:
            best = min(curve, key=lambda p: p[1])
            lines.append(f"{label:<10} {curve[0][1]:.4g} → {curve[-1][1]:.4g}  {sparkline([v for _, v in curve])}"
                         + (f"  (best {best[1]:.4g} at step {best[0]:g})" if key == "eval_loss" else ""))
    for name, value in run.eval_metrics().items():
        lines.append(f"{'eval':<10} {name} = {_number(value)}")
    tracking = run.run.tracking()
    if "mlflow" in tracking:
        lines.append(f"mlflow     run {tracking['mlflow']['run_id']} in {tracking['mlflow']['uri']}")
    for name in sorted(set(tracking) - {"mlflow"}):
        lines.append(f"{name:<10} {json.dumps(tracking[name])}")
    return "\n".join(lines)


SUMMARY_ROWS = (("steps", "steps"), ("train loss", "final_train_loss"), ("eval loss", "final_eval_loss"),
                ("tokens", "tokens_seen"), ("seconds", "train_seconds"), ("peak MB", "peak_memory_mb"),
                ("trainable params", "trainable_parameters"))


def compare_rows(runs: list[RunInfo]) -> list[list[str]]:
    """Header, then the config fields that differ between the runs, the results, and the evaluations
    that any of them has."""
    flats = [flat_params(run.settings) for run in runs]
    keys = sorted({k for flat in flats for k in flat})
    rows = [["", *[run.name for run in runs]]]
    for key in keys:
        values = [flat.get(key) for flat in flats]
        # A section only some tasks have (preference, grpo...) is shown where its values differ among the
        # runs that have it; the task row already says the others have none.
        present = {json.dumps(flat[key]) for flat in flats if key in flat}
        if len(present) > 1 and key not in ("name", "output.name"):
            rows.append([key, *[_number(v) for v in values]])
    for label, key in SUMMARY_ROWS:
        rows.append([label, *[_number(run.value(key)) for run in runs]])
    evals = [run.eval_metrics() for run in runs]
    for key in sorted({k for e in evals for k in e}):
        rows.append([key, *[_number(e.get(key)) for e in evals]])
    return rows


def _html_table(rows: list[list[str]]) -> str:
    e = html.escape
    head = "<tr>" + "".join(f"<th>{e(c)}</th>" for c in rows[0]) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f"<table>{head}{body}</table>"


def report_html(runs: list[RunInfo]) -> str:
    """One page: the loss curves of every run overlaid (train, then eval) and the comparison table."""
    names = [run.name for run in runs]
    if len(set(names)) < len(names):  # same-named runs from different folders
        names = [str(run.path) for run in runs]
    charts = [line_chart("train loss", {n: r.curve("loss") for n, r in zip(names, runs) if r.curve("loss")})]
    if any(r.curve("eval_loss") for r in runs):
        charts.append(line_chart("eval loss", {n: r.curve("eval_loss") for n, r in zip(names, runs)
                                               if r.curve("eval_loss")}))
    title = "runs: " + ", ".join(names)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:13px}} th{{background:#f4f4f4}}</style>
</head><body><h1>{html.escape(title)}</h1>
{"".join(f"<div>{chart}</div>" for chart in charts)}
{_html_table(compare_rows(runs))}
<p>From the run folders: {html.escape(", ".join(str(r.path) for r in runs))}</p>
</body></html>
"""


def write_report(runs: list[RunInfo], out: Path) -> Path:
    write_text_atomic(out, report_html(runs))
    return out
