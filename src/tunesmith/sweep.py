"""`tunesmith sweep SWEEP.yaml`: a hyperparameter search on Optuna, each trial a `tunesmith train` run.

The study lives in OUTPUT/study.db (SQLite). Running the sweep again loads it and adds trials until it has
``trials`` (``--trials N`` raises the target). A trial is the base config with the overrides and its sampled
params, named <study>-trial-<number>, with its own run folder under OUTPUT/runs/ (and its own MLflow run, as
the config's tracking section says), started as a child process in a free slot of ``LocalExecutor`` (a GPU,
which the child sees alone, or the machine). While it trains, its metrics.jsonl is read as it grows: each new
record with the objective is reported to the trial and judged by the pruner, in step order, and when the pruner
says so the run gets SIGTERM (it checkpoints and stops) and the trial is PRUNED at that step.

A trial's value is what its run's summary.json reports as ``final_<objective>`` (``final_eval_loss``: the eval
at the end, or with training.keep_best the best eval's, whose weights the run keeps), else the objective's
last value in metrics.jsonl (the train ``loss``, for one). A run that fails makes its trial FAIL, with its
log's last lines. A sweep stopped by Ctrl-C or SIGTERM stops its running trials the same way and queues their
params again; one that was killed leaves its trials RUNNING in the study, and the next sweep marks them FAIL
and queues their params again. Neither kind of interrupted trial counts towards ``trials``.

At the end, OUTPUT/best.yaml (the base config with the overrides and the best trial's params: a config to
`tunesmith train`) and OUTPUT/report.html (every trial, and the objective against each param) are written.
"""

from __future__ import annotations

import fcntl
import html
import logging
import math
import os
import queue
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from tunesmith.config.load import dump_config
from tunesmith.config.sweep import ParamConfig, PrunerConfig, SamplerConfig, SweepConfig, SweepPlan, load_sweep
from tunesmith.errors import ConfigError, RunStopped, TunesmithError
from tunesmith.io import write_text_atomic
from tunesmith.launch import EXIT_FINISHED, LocalExecutor, TrainProcess, train_command
from tunesmith.plots import scatter_chart
from tunesmith.rundir import RunDir
from tunesmith.tracking import check_backends

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often a running trial's metrics.jsonl is read
LOG_TAIL_LINES = 15  # of a failed trial's log, shown with its error
STOP_MARGIN_S = 60.0  # a stopped trial may take its preemption_grace_s plus this to checkpoint, then is killed
# The trials' user attributes in the study.
RUN_DIR_ATTR, STEPS_ATTR, ERROR_ATTR, RETRY_OF_ATTR = "run_dir", "steps", "error", "retry_of"


@dataclass(frozen=True)
class SweepDir:
    """A sweep's output folder::

        study.db      the Optuna study (SQLite)
        best.yaml     the base config with the overrides and the best trial's params
        report.html   every trial, and the objective against each param
        runs/         the trials' run folders, <study>-trial-<number>/ (rundir's layout), and MLflow's store
        configs/      each trial's training config, as it was started
        logs/         each trial's `tunesmith train` output
        sweep.lock    held while a sweep runs: one sweep at a time per study
    """

    path: Path

    @property
    def study_db(self) -> Path:
        return self.path / "study.db"

    @property
    def storage(self) -> str:
        return f"sqlite:///{self.study_db}"

    @property
    def best_file(self) -> Path:
        return self.path / "best.yaml"

    @property
    def report_file(self) -> Path:
        return self.path / "report.html"

    @property
    def runs_dir(self) -> Path:
        return self.path / "runs"

    @property
    def lock_file(self) -> Path:
        return self.path / "sweep.lock"

    def run(self, name: str) -> RunDir:
        return RunDir(self.runs_dir / name)

    def config_file(self, name: str) -> Path:
        return self.path / "configs" / f"{name}.yaml"

    def log_file(self, name: str) -> Path:
        return self.path / "logs" / f"{name}.log"


def trial_name(study: str, number: int) -> str:
    """A trial's run name.

    >>> trial_name("lr-search", 3)
    'lr-search-trial-3'
    """
    return f"{study}-trial-{number}"


class TrialFailed(TunesmithError):
    """A trial's training failed or reported nothing: the study records the trial as FAIL and the sweep goes on."""


class SweepStopping(Exception):
    """Raised by a trial once the sweep was told to stop: Optuna ends the optimization (the trial is FAIL, its
    params queued again)."""


@dataclass
class SweepResult:
    plan: SweepPlan
    folder: SweepDir
    trials: list[FrozenTrial]
    best: FrozenTrial | None


def run_sweep(path: Path, trials: int | None = None, parallel: int | None = None) -> SweepResult:
    """Run the sweep file at ``path`` until its study has ``trials`` trials (``trials`` and ``parallel``: the
    command's flags, over the file's); write best.yaml and report.html. Everything is validated first."""
    plan = load_sweep(path, trials, parallel)
    check_backends(plan.trial_config({}))  # a tracker that is not installed is refused before any trial
    folder = SweepDir(plan.output)
    executor = LocalExecutor()
    slots = trial_slots(executor.slots(), plan.config.parallel)
    with holding_lock(folder), optuna_quiet():
        study = open_study(plan, folder)
        recover(study)
        for entry in plan.config.enqueue:
            study.enqueue_trial(typed_params(plan.config, entry), skip_if_exists=True)
        todo = plan.config.trials - counted(study)
        runner = TrialRunner(plan, folder, executor, slots)
        received: list[int] = []
        if todo > 0:
            log.info("study %s: %d trial(s) to run, %d at a time (%s)", plan.study, todo, len(slots), folder.path)
            with stop_on_signals(runner) as received:
                try:
                    study.optimize(runner, n_trials=todo, n_jobs=len(slots), catch=(TrialFailed,))
                except SweepStopping:
                    pass
        else:
            log.info("study %s already has %d trial(s) (trials: %d): none to run; raise the target with --trials N",
                     plan.study, counted(study), plan.config.trials)
        result = finish(study, plan, folder)
    if received:
        name = signal.Signals(received[0]).name
        raise RunStopped(f"sweep {plan.study} stopped by {name}: its running trials checkpointed and stopped, and "
                         f"will run again; run the same command to go on (report: {folder.report_file})",
                         "preempted", 128 + received[0])
    return result


def trial_slots(slots: list[str | None], parallel: int | None) -> list[str | None]:
    """The slot of each training at once: one per slot by default; ``parallel`` more than the slots shares them
    round the slots (two trainings on one GPU).

    >>> trial_slots(["0", "1"], None), trial_slots(["0", "1"], 3), trial_slots([None], 1)
    (['0', '1'], ['0', '1', '0'], [None])
    """
    return list(slots) if parallel is None else [slots[index % len(slots)] for index in range(parallel)]


@contextmanager
def holding_lock(folder: SweepDir) -> Iterator[None]:
    """One sweep at a time per study: a second would take the first's running trials for a killed sweep's."""
    folder.path.mkdir(parents=True, exist_ok=True)
    with folder.lock_file.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise TunesmithError(f"{folder.path}: another tunesmith sweep (pid {holder}) is running this study; wait "
                                 "for it, or stop it (its trials checkpoint and stop)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield


@contextmanager
def optuna_quiet() -> Iterator[None]:
    """Optuna's own INFO and WARNING lines off: the sweep says what each trial did (and a failed trial's
    warning would carry a traceback of our own error)."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def build_sampler(config: SamplerConfig, offset: int) -> optuna.samplers.BaseSampler:
    """The sampler, seeded with seed + ``offset`` (the trials the study has: a resumed sweep does not draw the
    same params again)."""
    if config.type == "random":
        return optuna.samplers.RandomSampler(seed=config.seed + offset)
    return optuna.samplers.TPESampler(seed=config.seed + offset, n_startup_trials=config.n_startup_trials)


def build_pruner(config: PrunerConfig) -> optuna.pruners.BasePruner:
    if config.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=config.n_startup_trials,
                                           n_warmup_steps=config.n_warmup_steps)
    if config.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=config.min_resource,
                                                      reduction_factor=config.reduction_factor,
                                                      min_early_stopping_rate=config.min_early_stopping_rate)
    return optuna.pruners.NopPruner()


def open_study(plan: SweepPlan, folder: SweepDir) -> optuna.Study:
    """The study in OUTPUT/study.db, created or loaded."""
    study = optuna.create_study(storage=folder.storage, study_name=plan.study, direction=plan.config.direction,
                                pruner=build_pruner(plan.config.pruner), load_if_exists=True)
    if study.direction.name.lower() != plan.config.direction:
        raise ConfigError([f"direction: study {plan.study} in {folder.study_db} was created to "
                           f"{study.direction.name.lower()}; keep that, or give the sweep another study or output"],
                          str(plan.file))
    study.sampler = build_sampler(plan.config.sampler, len(study.trials))
    known = {trial_name(plan.study, trial.number) for trial in study.trials}
    stale = sorted(p.name for p in folder.runs_dir.glob(f"{plan.study}-trial-*") if p.name not in known)
    if stale:
        raise TunesmithError(f"{folder.runs_dir}: {', '.join(stale[:3])}{' ...' if len(stale) > 3 else ''} are run "
                             f"folders of trials {folder.study_db} does not hold (was it removed?), and new trials "
                             "would take their names; move them away, or give the sweep another output")
    return study


def typed_params(config: SweepConfig, entry: dict[str, Any]) -> dict[str, Any]:
    """An enqueued param set as the trial takes it (Optuna compares an int 1 and a float 1.0 as different)."""
    return {key: config.params[key].typed(value) for key, value in entry.items()}


def requeue(study: optuna.Study, number: int, params: dict[str, Any]) -> None:
    """Queue an interrupted trial's params again, as a new trial that records which it retries."""
    study.enqueue_trial(params, user_attrs={RETRY_OF_ATTR: number})


def recover(study: optuna.Study) -> None:
    """Trials a killed sweep left RUNNING: marked FAIL, their params queued again."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
        study.tell(trial.number, state=TrialState.FAIL)
        requeue(study, trial.number, params)
        log.warning("trial %d was left running by a sweep that ended without a word: marked failed, its params "
                    "queued again", trial.number)


def counted(study: optuna.Study) -> int:
    """The trials that count towards ``trials``: finished ones, but not the interrupted ones queued again."""
    trials = study.get_trials(deepcopy=False)
    retried = {trial.user_attrs.get(RETRY_OF_ATTR) for trial in trials}
    return sum(1 for trial in trials if trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (trial.state == TrialState.FAIL and trial.number not in retried))


def suggest_params(trial: Trial, params: dict[str, ParamConfig]) -> dict[str, Any]:
    """Each param's value for this trial (an enqueued trial's are fixed; Optuna samples the rest)."""
    values: dict[str, Any] = {}
    for name, space in params.items():
        if space.kind == "categorical":
            values[name] = trial.suggest_categorical(name, space.choices)
        elif space.kind == "int":
            values[name] = trial.suggest_int(name, int(space.low), int(space.high), step=int(space.step or 1),
                                             log=space.log)
        else:
            values[name] = trial.suggest_float(name, float(space.low), float(space.high), step=space.step,
                                               log=space.log)
    return values


def shown(params: dict[str, Any]) -> str:
    """Params for a progress line.

    >>> shown({"training.lr": 0.000123456, "method.lora.r": 8})
    'training.lr=0.0001235 method.lora.r=8'
    """
    return " ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                    for key, value in params.items())


class MetricsTail:
    """The objective's values in a run's metrics.jsonl, read as the file grows: a line still being written waits
    for the next read; a file rewritten shorter (a rollback) is read again from its start, and a step already
    read is not read twice."""

    def __init__(self, run: RunDir, objective: str):
        self.run, self.objective = run, objective
        self.offset = 0
        self.values: dict[int, float] = {}  # step -> value, in the order read
        self.keys: set[str] = set()  # every key seen: what the run reports, for the error when it is not objective

    def read(self) -> list[tuple[int, float]]:
        """The (step, value) records new since the last read."""
        records, self.offset = self.run.metrics_after(self.offset)
        found = []
        for record in records:
            self.keys.update(record)
            step, value = record.get("step"), record.get(self.objective)
            if isinstance(step, int) and isinstance(value, int | float) and not isinstance(value, bool) \
                    and math.isfinite(value) and step not in self.values:
                self.values[step] = float(value)
                found.append((step, float(value)))
        return found

    @property
    def last(self) -> tuple[int, float] | None:
        return next(reversed(self.values.items()), None)


class TrialRunner:
    """Optuna's objective: a trial is one `tunesmith train` run in a free slot, reporting its objective as it
    trains. ``stop()`` (from a signal handler) makes the running trials checkpoint and stop."""

    def __init__(self, plan: SweepPlan, folder: SweepDir, executor: LocalExecutor, slots: list[str | None]):
        self.plan, self.folder, self.executor = plan, folder, executor
        self.objective = plan.config.objective
        self.free: queue.Queue[str | None] = queue.Queue()
        for slot in slots:
            self.free.put(slot)
        self.stopping = threading.Event()
        self.running: dict[int, TrainProcess] = {}  # set and popped whole: safe to read from a signal handler
        # how long a stopped trial may take to checkpoint before it is killed
        self.grace_s = plan.trial_config({}).training.preemption_grace_s + STOP_MARGIN_S

    def stop(self) -> None:
        self.stopping.set()
        for process in list(self.running.values()):
            process.terminate()

    def __call__(self, trial: Trial) -> float:
        params = suggest_params(trial, self.plan.config.params)
        self._stop_if_stopping(trial, params)
        name = trial_name(self.plan.study, trial.number)
        run = self.folder.run(name)
        trial.set_user_attr(RUN_DIR_ATTR, str(run.path))
        config_file = self._write_config(trial, params, name)
        slot = self.free.get()
        try:
            return self._train(trial, params, run, config_file, slot)
        finally:
            self.free.put(slot)
            trial.set_user_attr(STEPS_ATTR, run.status().get("step") if run.status_file.is_file() else None)

    def _stop_if_stopping(self, trial: Trial, params: dict[str, Any]) -> None:
        if self.stopping.is_set():
            requeue(trial.study, trial.number, params)
            raise SweepStopping(f"trial {trial.number}: the sweep is stopping")

    def _write_config(self, trial: Trial, params: dict[str, Any], name: str) -> Path:
        try:
            config = self.plan.trial_config(params, name, self.folder.runs_dir)
        except ConfigError as err:
            trial.set_user_attr(ERROR_ATTR, "; ".join(err.problems))
            log.error("trial %d failed: its config is refused (%s): %s", trial.number, shown(params), err)
            raise TrialFailed(f"trial {trial.number}: {err}") from None
        path = self.folder.config_file(name)
        write_text_atomic(path, dump_config(config))
        return path

    def _train(self, trial: Trial, params: dict[str, Any], run: RunDir, config_file: Path, slot: str | None
               ) -> float:
        log.info("trial %d started%s: %s", trial.number, f" on GPU {slot}" if slot is not None else "", shown(params))
        process = self.executor.start(train_command(config_file, resume=False), self.folder.log_file(run.name), slot)
        self.running[trial.number] = process
        try:
            if self.stopping.is_set():  # the signal came while it started
                process.terminate()
            code, tail = self._watch(trial, process, run)
        finally:
            self.running.pop(trial.number, None)
        if code != EXIT_FINISHED and self.stopping.is_set():
            self._stop_if_stopping(trial, params)
        if code != EXIT_FINISHED:
            raise self._failure(trial, params, run, code)
        value = trial_value(run, tail, self.objective)
        log.info("trial %d complete: %s %.6g at step %s (%s)", trial.number, self.objective, value,
                 run.status().get("step"), shown(params))
        return value

    def _watch(self, trial: Trial, process: TrainProcess, run: RunDir) -> tuple[int, MetricsTail]:
        """Report the objective as the run writes it, until the run ends or the pruner stops it. Each value is
        reported and judged in step order, as Optuna does in-process: the decision is the values', not the
        timing's (a run that got past the step it is pruned at before it was told, or even finished, is still
        PRUNED at that step)."""
        tail = MetricsTail(run, self.objective)
        while True:
            code = process.poll()  # before the read: once it has ended, the read gets everything it wrote
            for step, value in tail.read():
                trial.report(value, step)
                if not self.stopping.is_set() and trial.should_prune():
                    self._prune(trial, process, step, value)
            if code is not None:
                return code, tail
            time.sleep(POLL_S)

    def _prune(self, trial: Trial, process: TrainProcess, step: int, value: float) -> NoReturn:
        ended = process.poll() is not None
        log.info("trial %d pruned at step %d: %s %.6g (%s)%s", trial.number, step, self.objective, value,
                 shown(trial.params), " (its run had already ended)" if ended else "")
        process.terminate()  # checkpoint and stop
        if process.wait(self.grace_s) is None:
            log.warning("trial %d did not stop within %.0f s of SIGTERM: killed", trial.number, self.grace_s)
            process.kill()
            process.wait()
        raise optuna.TrialPruned(f"at step {step}: {self.objective} {value:.6g}")

    def _failure(self, trial: Trial, params: dict[str, Any], run: RunDir, code: int) -> TrialFailed:
        reason = run.status().get("reason") if run.status_file.is_file() else None
        log_file = self.folder.log_file(run.name)
        try:
            lines = log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            lines = []
        what = f"{reason} (exit {code})" if reason else f"exit {code}"
        trial.set_user_attr(ERROR_ATTR, what)
        message = (f"trial {trial.number} failed: its training ended with {what} ({shown(params)}); the end of "
                   f"{log_file}:\n" + "\n".join(f"    {line}" for line in lines))
        log.error("%s", message)
        return TrialFailed(message)


def trial_value(run: RunDir, tail: MetricsTail, objective: str) -> float:
    """A finished run's value: summary.json's ``final_<objective>``, else the objective's last value read."""
    final = (run.summary() or {}).get(f"final_{objective}")
    if isinstance(final, int | float) and not isinstance(final, bool):
        return float(final)
    if tail.last is not None:
        return tail.last[1]
    reported = ", ".join(sorted(tail.keys - {"step"})) or "nothing"
    raise TrialFailed(f"{run.path}: the run reported no {objective} (its metrics.jsonl has {reported}); set the "
                      "sweep's objective to one of those")


@contextmanager
def stop_on_signals(runner: TrialRunner) -> Iterator[list[int]]:
    """Ctrl-C or SIGTERM: the running trials checkpoint and stop and the sweep ends after them (their params
    queued again); a second signal acts as it did before. Yields the signals received. In the main thread
    only (Python's rule for signal handlers); elsewhere nothing is installed."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous: dict[int, Any] = {}

    def handle(number: int, _frame: object) -> None:
        received.append(number)
        for caught, handler in previous.items():
            signal.signal(caught, handler)
        log.warning("%s: the running trials checkpoint and stop; run the sweep again to go on",
                    signal.Signals(number).name)
        runner.stop()

    previous.update({number: signal.signal(number, handle) for number in (signal.SIGINT, signal.SIGTERM)})
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def finish(study: optuna.Study, plan: SweepPlan, folder: SweepDir) -> SweepResult:
    """Write best.yaml (when a trial completed) and report.html."""
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    if best is not None:
        write_best(plan, folder, best, len(trials))
    write_report(plan, folder, trials, best)
    return SweepResult(plan, folder, trials, best)


def write_best(plan: SweepPlan, folder: SweepDir, best: FrozenTrial, count: int) -> None:
    """best.yaml: the base config with the overrides and the best trial's params, named <study>-best, in the
    base config's output.dir: a config to `tunesmith train` (longer, or on more data)."""
    config = plan.trial_config(best.params, f"{plan.study}-best")
    header = (f"# tunesmith sweep {plan.study}: the best of {count} trials is trial {best.number} "
              f"({plan.config.objective} {best.value:.6g}; run folder {best.user_attrs.get(RUN_DIR_ATTR)})\n"
              f"# {plan.base} with the sweep's overrides and its params: {shown(best.params)}\n"
              f"# train it: tunesmith train {folder.best_file}\n")
    write_text_atomic(folder.best_file, header + dump_config(config))


def _value_cell(trial: FrozenTrial, retries: dict[int, int]) -> str:
    """The value column: a completed trial's value, a pruned one's last reported, or why it failed."""
    if trial.state == TrialState.COMPLETE:
        return f"{trial.value:.6g}"
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        step = max(trial.intermediate_values)
        return f"{trial.intermediate_values[step]:.6g} at step {step} (pruned)"
    if trial.number in retries:
        return f"interrupted: its params queued again as trial {retries[trial.number]}"
    return str(trial.user_attrs.get(ERROR_ATTR, ""))


def _report_row(trial: FrozenTrial, params: list[str], folder: SweepDir, best: FrozenTrial | None,
                retries: dict[int, int]) -> str:
    run = Path(trial.user_attrs.get(RUN_DIR_ATTR, ""))
    shown_run = str(run.relative_to(folder.path)) if run.is_relative_to(folder.path) else str(run)
    link = f'<a href="{html.escape(shown_run)}/">{html.escape(shown_run)}</a>' if trial.user_attrs.get(
        RUN_DIR_ATTR) else ""
    values = "".join(f"<td>{html.escape(_cell(trial.params.get(name, '')))}</td>" for name in params)
    steps = trial.user_attrs.get(STEPS_ATTR)
    mark = " best" if best is not None and trial.number == best.number else ""
    return (f'<tr id="trial-{trial.number}" class="{trial.state.name.lower()}{mark}"><td>{trial.number}</td>'
            f"<td>{trial.state.name}</td><td>{html.escape(_value_cell(trial, retries))}</td>"
            f"<td>{'' if steps is None else steps}</td>{values}<td>{link}</td></tr>")


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def param_chart(objective: str, name: str, space: ParamConfig, trials: list[FrozenTrial]) -> str:
    """The objective against one param: completed trials as dots, pruned ones as rings at the last value they
    reported; a log axis for a log param, one slot per choice for a categorical one."""
    labels = [str(choice) for choice in space.choices or []] if space.kind == "categorical" else None
    complete: list[tuple[float, float, str]] = []
    pruned: list[tuple[float, float, str]] = []
    for trial in trials:
        value = trial.params.get(name)
        if value is None or (labels is not None and value not in (space.choices or [])):
            continue
        x = float(space.choices.index(value)) if labels is not None else float(value)
        if trial.state == TrialState.COMPLETE and math.isfinite(trial.value):
            complete.append((x, trial.value, f"trial {trial.number}: {trial.value:.6g}"))
        elif trial.state == TrialState.PRUNED and trial.intermediate_values:
            step = max(trial.intermediate_values)
            pruned.append((x, trial.intermediate_values[step], f"trial {trial.number}: pruned at step {step}"))
    return scatter_chart(f"{objective} vs {name}", {"complete": complete, "pruned (last reported)": pruned}, name,
                         objective, log_x=space.log, x_labels=labels)


def write_report(plan: SweepPlan, folder: SweepDir, trials: list[FrozenTrial], best: FrozenTrial | None) -> None:
    """report.html: a table of every trial (number, state, value, steps reached, params, run folder) and a chart
    of the objective against each param."""
    config, params = plan.config, list(plan.config.params)
    counts = ", ".join(f"{count} {state.lower()}" for state, count in Counter(t.state.name for t in trials).items())
    verdict = (f"best: trial {best.number}, {config.objective} {best.value:.6g} ({html.escape(shown(best.params))});"
               f" its config: <a href=\"best.yaml\">best.yaml</a>") if best else "no trial completed"
    heads = "".join(f"<th>{html.escape(name)}</th>" for name in params)
    retries = {t.user_attrs[RETRY_OF_ATTR]: t.number for t in trials if RETRY_OF_ATTR in t.user_attrs}
    rows = "".join(_report_row(trial, params, folder, best, retries) for trial in trials)
    charts = "".join(param_chart(config.objective, name, space, trials) for name, space in config.params.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>tunesmith sweep {html.escape(plan.study)}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.2em .8em;text-align:left}}svg{{margin:1em 1em 0 0}}
tr.pruned{{color:#777;font-style:italic}}tr.fail{{color:#b33}}tr.best{{font-weight:bold}}</style>
</head><body><h1>Sweep {html.escape(plan.study)}</h1>
<p>{html.escape(config.objective)} ({config.direction}) over {len(trials)} trials ({counts}); {verdict}</p>
<table><tr><th>trial</th><th>state</th><th>{html.escape(config.objective)}</th><th>steps</th>{heads}
<th>run folder</th></tr>{rows}</table>
{charts}</body></html>
"""
    write_text_atomic(folder.report_file, page)
