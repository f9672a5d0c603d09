"""`tunesmith sweep`: Optuna trials of `tunesmith train` on the tiny model, pruned on the eval loss they report
while they train; best.yaml and report.html; a second run adds trials to the same study; a bad sweep file is
refused before any trial starts.

The sweep is made deterministic by its three enqueued param sets: trial 0 learns (lr 2e-3), trial 1 cannot
(lr 1e-7: its eval loss stays at the start's) and trial 2 learns fastest (lr 1e-2). With the median pruner's
n_startup_trials 1 and n_warmup_steps 0, trial 1 is worse than trial 0 at its first eval and is pruned there,
and trial 2 is better than trial 0 at every eval and is not (the sweep judges the reported values in step
order, so timing does not change the decisions). Planted once, and caught: the trial never calling
``trial.report`` (in ``TrialRunner._watch``) made trial 1 run to its end and COMPLETE, and the state assertion
failed ([COMPLETE, COMPLETE, COMPLETE]).

Each trial is a `tunesmith train` process of about 8 s on 2 CPU cores (mostly its imports; its 40 steps take
1 s), four of them in all: the file takes about 50 s (58 s with pytest's start, on a machine other tests kept
busy).
"""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from helpers import read_metrics, tiny_tree
from tunesmith.cli.main import main
from tunesmith.config.load import load_config
from tunesmith.config.sweep import load_sweep
from tunesmith.errors import ConfigError
from tunesmith.rundir import RunDir
from tunesmith.sweep import MetricsTail

STUDY = "tiny-sweep"
STEPS = 40  # 1 s of training: a pruned run is still training when its SIGTERM comes (the rest is its start)
PARAMS = {"training.lr": {"type": "float", "low": 1e-7, "high": 1e-2, "log": True},
          "method.lora.r": {"choices": [4, 8]}}
ENQUEUE = [{"training.lr": 2e-3, "method.lora.r": 8},  # learns
           {"training.lr": 1e-7, "method.lora.r": 8},  # cannot learn: pruned at its first eval
           {"training.lr": 1e-2, "method.lora.r": 4}]  # learns fastest: the best


def write_base(tmp_path: Path, model_dir: Path, data: Path, backends: list[str] | None = None) -> None:
    tree = tiny_tree(model_dir, data, tmp_path / "unused", "lora", max_steps=30, eval_every=2, log_every=2)
    tree["data"]["eval"] = str(data)  # the training rows: a deterministic, small eval
    if backends is not None:
        tree["tracking"] = {"backends": backends}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tree))


def write_sweep(tmp_path: Path, model_dir: Path, data: Path, **fields) -> Path:
    write_base(tmp_path, model_dir, data)
    sweep = {"base": "base.yaml", "study": STUDY, "output": str(tmp_path / "sweep"), "trials": 3, "parallel": 1,
             "overrides": {"training.max_steps": STEPS},
             "pruner": {"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
             "params": PARAMS, "enqueue": ENQUEUE, **fields}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def load_study(out: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out / 'study.db'}")


@pytest.mark.long
def test_a_sweep_prunes_writes_best_and_report_and_resumes(tiny_model_dir, chat_file, tmp_path, capsys):
    path = write_sweep(tmp_path, tiny_model_dir, chat_file)
    assert main(["sweep", str(path)]) == 0, capsys.readouterr().err
    out = tmp_path / "sweep"
    trials = load_study(out).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    assert [t.params for t in trials] == ENQUEUE
    runs = [RunDir(Path(t.user_attrs["run_dir"])) for t in trials]
    assert [run.path for run in runs] == [out / "runs" / f"{STUDY}-trial-{n}" for n in range(3)]

    # Completed: every eval was reported, and the value is the summary's final eval loss (after the steps of
    # the overrides, not the base config's 30).
    for trial, run in zip((trials[0], trials[2]), (runs[0], runs[2])):
        evals = {r["step"]: r["eval_loss"] for r in read_metrics(run.path) if "eval_loss" in r}
        assert trial.intermediate_values == pytest.approx(evals) and sorted(evals) == list(range(2, STEPS + 1, 2))
        assert trial.value == pytest.approx(run.summary()["final_eval_loss"]) and trial.user_attrs["steps"] == STEPS
    # Pruned at its first eval, worse than trial 0's there; stopped by SIGTERM with a checkpoint (preempted).
    first_eval = {r["step"]: r["eval_loss"] for r in read_metrics(runs[0].path) if "eval_loss" in r}[2]
    assert list(trials[1].intermediate_values) == [2] and trials[1].intermediate_values[2] > first_eval
    assert runs[1].status()["status"] == "preempted" and not runs[1].finished
    assert trials[1].user_attrs["steps"] < STEPS and trials[2].value < trials[0].value

    best = load_config(out / "best.yaml")  # a config `tunesmith train` takes
    assert best.training.lr == 1e-2 and best.method.lora.r == 4 and best.training.max_steps == STEPS
    assert best.run_name == f"{STUDY}-best" and best.output.dir == str(tmp_path / "unused")
    page = (out / "report.html").read_text()
    rows = dict(re.findall(r'<tr id="trial-(\d+)" class="([\w ]+)">', page))
    assert rows == {"0": "complete", "1": "pruned", "2": "complete best"}
    assert all(f"runs/{STUDY}-trial-{n}" in page for n in range(3)) and "(pruned)" in page
    assert page.count("<svg") == 2 and "(log scale)" in page

    # Running again with --trials 4 adds one trial to the same study, its run tracked by MLflow this time.
    before = [(t.state, t.params, t.value, t.intermediate_values, t.user_attrs) for t in trials]
    write_base(tmp_path, tiny_model_dir, chat_file, backends=["mlflow"])
    assert main(["sweep", str(path), "--trials", "4"]) == 0, capsys.readouterr().err
    trials = load_study(out).trials
    assert [(t.state, t.params, t.value, t.intermediate_values, t.user_attrs) for t in trials[:3]] == before
    assert len(trials) == 4 and trials[3].state in (TrialState.COMPLETE, TrialState.PRUNED)
    fourth = RunDir(Path(trials[3].user_attrs["run_dir"]))
    assert fourth.name == f"{STUDY}-trial-3" and fourth.config().training.lr == trials[3].params["training.lr"]
    mlflow = pytest.importorskip("mlflow")
    store = mlflow.MlflowClient(f"sqlite:///{out / 'runs' / 'mlflow.db'}")
    logged = store.get_run(fourth.tracking()["mlflow"]["run_id"])
    assert logged.info.run_name == f"{STUDY}-trial-3" and logged.data.tags["tunesmith.run_dir"] == str(fourth.path)
    assert 'id="trial-3"' in (out / "report.html").read_text()


def test_a_misspelled_param_is_refused_before_any_trial(tiny_model_dir, chat_file, tmp_path, capsys):
    params = {"training.lrr": PARAMS["training.lr"], "method.lora.r": PARAMS["method.lora.r"]}
    path = write_sweep(tmp_path, tiny_model_dir, chat_file, params=params, enqueue=[])
    assert main(["sweep", str(path)]) == 2
    error = capsys.readouterr().err
    assert "params.training.lrr at low 1e-07: training.lrr: unknown field" in error
    assert "did you mean 'training.lr'?" in error and error.count("training.lrr: unknown field") == 1
    assert not (tmp_path / "sweep").exists()  # no study, no run folder


@pytest.mark.parametrize("fields, message", [
    ({"params": {**PARAMS, "training.lr": {"type": "float", "low": 1e-2, "high": 1e-3}}},
     "params.training.lr: low (0.01) must be below high (0.001)"),
    ({"params": {**PARAMS, "training.lr": {"type": "float", "low": 0.0, "high": 1e-3, "log": True}}},
     "params.training.lr: log needs low above 0 (got 0.0)"),
    ({"params": {**PARAMS, "method.lora.r": {"choices": [8]}}}, "a single value is fixed: put it in overrides"),
    ({"params": {**PARAMS, "training.lr": {"low": 1e-4, "high": 1e-2}}}, "give type: float or int with low and high"),
    ({"params": {**PARAMS, "training.lr": {"type": "float", "low": 1e-7, "high": 2.0}}},
     "params.training.lr at high 2.0: training.lr: 2.0 is invalid: Input should be less than or equal to 1"),
    ({"enqueue": [{"training.lr": 0.5}]}, "enqueue[0].training.lr: 0.5 is outside params.training.lr"),
    ({"enqueue": [{"training.seed": 1}]}, "enqueue[0].training.seed: not one of params"),
    ({"overrides": {"training.max_step": 8}}, "training.max_step: unknown field (value 8); did you mean"),
    ({"overrides": {"name": "x"}}, "name: set by the sweep"),
    ({"overrides": {"training.eval_every": None}}, "pruner median: the trials report eval_loss only at the end"),
    ({"overrides": {"data.eval": []}}, "objective eval_loss: the base config has no eval data"),
    ({"trails": 3}, "trails: unknown field (value 3); did you mean 'trials'?"),
    ({"trials": 2}, "enqueue has 3 param sets but trials is 2: raise trials"),
])
def test_sweep_file_problems_are_refused_with_the_field(tiny_model_dir, chat_file, tmp_path, fields, message):
    path = write_sweep(tmp_path, tiny_model_dir, chat_file, **fields)
    with pytest.raises(ConfigError) as caught:
        load_sweep(path)
    assert message in str(caught.value)


def test_metrics_tail_reads_whole_lines_once(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    tail = MetricsTail(RunDir(tmp_path), "eval_loss")
    assert tail.read() == [] and tail.last is None  # no file yet
    metrics.write_text('{"step": 2, "loss": 3.0}\n{"step": 2, "eval_loss": 2.5}\n{"step": 4, "eval_')
    assert tail.read() == [(2, 2.5)]  # the line being written waits
    with metrics.open("a") as stream:
        stream.write('loss": 2.0}\n')
    assert tail.read() == [(4, 2.0)] and tail.read() == []
    metrics.write_text('{"step": 2, "eval_loss": 2.5}\n')  # rewritten shorter (a rollback): read again
    assert tail.read() == [] and tail.last == (4, 2.0) and tail.keys == {"step", "loss", "eval_loss"}
