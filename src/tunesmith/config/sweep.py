"""`tunesmith sweep SWEEP.yaml`'s file, validated whole before any trial starts::

    base: ../quickstart.yaml              # the training config each trial starts from (beside this file)
    overrides: {training.max_steps: 20}   # set in every trial
    trials: 12
    objective: eval_loss                  # minimized (direction: maximize for a score)
    params:
      training.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      method.lora.r: {choices: [4, 8, 16]}
    enqueue:
      - {training.lr: 1.0e-3, method.lora.r: 16}   # the base config's values: a baseline, tried first

Each override and each param is set in a trial config that is validated as `tunesmith train` validates it
(a param at each end of its range and at each of its choices), so a misspelled field is refused with its
name, and a value the training config refuses with the config's own message, before anything runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from tunesmith.config.load import build_config, format_validation_error, read_yaml, set_dotted
from tunesmith.config.schema import Config, StrictModel
from tunesmith.errors import ConfigError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # a run name's (the trials' run folders start with the study's)
# Set by the sweep in every trial: each trial's run folder is OUTPUT/runs/<study>-trial-<number>.
SWEEP_SET = ("name", "output.dir", "output.name")
CHOICE_TYPES = (str, int, float, bool, type(None))  # what Optuna can store as a categorical choice


class SamplerConfig(StrictModel):
    """How each trial's params are chosen."""

    type: Literal["tpe", "random"] = Field("tpe", description="tpe: Optuna's Tree-structured Parzen Estimator, "
                                           "which models the finished trials; random: independent uniform draws")
    seed: int = Field(0, ge=0, description="the sampler's seed: with parallel 1, the same sweep samples the same "
                      "params (a resumed sweep seeds with seed + the trials the study has)")
    n_startup_trials: int = Field(10, ge=0, description="tpe: trials sampled at random before TPE models the "
                                  "results (enqueued trials count)")

    @model_validator(mode="after")
    def _tpe_fields(self) -> SamplerConfig:
        if self.type == "random" and "n_startup_trials" in self.model_fields_set:
            raise ValueError("sampler.n_startup_trials is for type tpe (random samples every trial); remove it")
        return self


PRUNER_FIELDS = {"n_startup_trials": "median", "n_warmup_steps": "median", "min_resource": "successive_halving",
                 "reduction_factor": "successive_halving", "min_early_stopping_rate": "successive_halving"}


class PrunerConfig(StrictModel):
    """When a trial is stopped early: its reported objective compared with the other trials' at the same step."""

    type: Literal["median", "successive_halving", "none"] = Field(
        "median", description="median: stop a trial whose best value so far is worse than the median of the "
        "completed trials' at the same step; successive_halving: keep the best 1/reduction_factor at each rung of "
        "steps; none: every trial runs to its end")
    n_startup_trials: int = Field(5, ge=0, description="median: completed trials before any trial is pruned")
    n_warmup_steps: int = Field(0, ge=0, description="median: no trial is pruned before this training step")
    min_resource: int | Literal["auto"] = Field("auto", description="successive_halving: training steps of the "
                                                "first rung (auto: estimated from the first completed trial)")
    reduction_factor: int = Field(4, ge=2, description="successive_halving: 1 of this many trials goes on at each "
                                  "rung")
    min_early_stopping_rate: int = Field(0, ge=0, description="successive_halving: rungs skipped before the first "
                                         "comparison")

    @model_validator(mode="after")
    def _type_fields(self) -> PrunerConfig:
        foreign = [f"pruner.{name} is for type {owner}" for name, owner in PRUNER_FIELDS.items()
                   if name in self.model_fields_set and owner != self.type]
        if foreign:
            raise ValueError(f"{'; '.join(foreign)}, not {self.type}; remove it or change pruner.type")
        if isinstance(self.min_resource, int) and self.min_resource < 1:
            raise ValueError(f"pruner.min_resource: {self.min_resource} must be 1 or more (training steps), or auto")
        return self


class ParamConfig(StrictModel):
    """One field's search space: a range (type float or int, low, high, log, step) or a list of choices."""

    type: Literal["float", "int", "categorical"] | None = Field(
        None, description="float or int (with low and high), categorical (with choices; the default when choices "
        "are given)")
    low: int | float | None = Field(None, description="the range's lower end (included)")
    high: int | float | None = Field(None, description="the range's upper end (included)")
    log: bool = Field(False, description="sample the range on a log scale (low must be above 0); learning rates")
    step: int | float | None = Field(None, gt=0, description="only values low + k x step (not with log)")
    choices: list[Any] | None = Field(None, description="the values to choose from: numbers, strings, booleans or "
                                      "null")

    @property
    def kind(self) -> Literal["float", "int", "categorical"]:
        return self.type or ("categorical" if self.choices is not None else "float")

    def probes(self) -> list[tuple[str, Any]]:
        """The values a trial config is validated with before the sweep starts: both ends, or every choice."""
        if self.kind == "categorical":
            return [("choice", choice) for choice in self.choices or []]
        return [("low", self.typed(self.low)), ("high", self.typed(self.high))]

    def typed(self, value: Any) -> Any:
        """A value of this space as the trial gets it (an int param's 8.0 is 8; a float param's 1 is 1.0)."""
        if isinstance(value, bool) or not isinstance(value, int | float) or self.kind == "categorical":
            return value
        return int(value) if self.kind == "int" else float(value)

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in (self.choices or [])
        if isinstance(value, bool) or not isinstance(value, int | float) or self.low is None or self.high is None:
            return False
        return self.low <= value <= self.high and (self.kind == "float" or float(value).is_integer())


def space_problems(name: str, space: ParamConfig) -> list[str]:
    """What is wrong with one param's search space (each problem names ``params.<name>`` and the fix)."""
    where = f"params.{name}"
    if space.type is None and space.choices is None:
        return [f"{where}: give type: float or int with low and high, or choices: [...]"]
    if space.kind == "categorical":
        ranged = [key for key in ("low", "high", "step") if getattr(space, key) is not None] + (
            ["log"] if space.log else [])
        if ranged:
            return [f"{where}: {', '.join(ranged)} are for type float or int; a categorical param takes choices"]
        if not space.choices or len(space.choices) < 2:
            return [f"{where}: choices needs two values or more (a single value is fixed: put it in overrides)"]
        odd = [repr(c) for c in space.choices if not isinstance(c, CHOICE_TYPES)]
        return [f"{where}: choices {', '.join(odd)} are not numbers, strings, booleans or null (what Optuna "
                "stores); put a list or section value in overrides"] if odd else []
    if space.choices is not None:
        return [f"{where}: choices are for a categorical param; give low and high for type {space.kind}"]
    if space.low is None or space.high is None:
        return [f"{where}: type {space.kind} needs low and high"]
    problems = []
    if space.kind == "int" and not all(float(v).is_integer() for v in (space.low, space.high, space.step or 1)):
        problems.append(f"{where}: type int needs whole numbers for low, high and step")
    if not space.low < space.high:
        problems.append(f"{where}: low ({space.low}) must be below high ({space.high})")
    if space.log and space.low <= 0:
        problems.append(f"{where}: log needs low above 0 (got {space.low})")
    if space.log and space.step is not None and not (space.kind == "int" and space.step == 1):
        problems.append(f"{where}: step and log do not go together; remove one")
    return problems


class SweepConfig(StrictModel):
    """`tunesmith sweep` input: Optuna trials of `tunesmith train`, each the base config with the overrides and
    its sampled params, pruned on the objective they report while they train."""

    base: str = Field(min_length=1, description="the training config each trial starts from (relative to the "
                      "sweep file)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted config fields set in every trial, "
                                      "e.g. {training.max_steps: 50}; a mapping value replaces that whole section")
    study: str | None = Field(None, pattern=NAME_PATTERN, description="the Optuna study's name, which starts "
                              "every trial's run name (default: the sweep file's name without .yaml)")
    output: str | None = Field(None, min_length=1, description="the folder of study.db, best.yaml, report.html and "
                               "the trials' run folders (runs/), relative to the working folder (default: "
                               "runs/sweeps/<study>)")
    trials: int = Field(ge=1, description="the study's total number of trials: a sweep runs trials until the study "
                        "has this many (a killed sweep's interrupted trials do not count); --trials raises it")
    parallel: int | None = Field(None, ge=1, description="trainings at once (default: one per GPU, each seeing "
                                 "only its own; one on a machine without GPUs)")
    objective: str = Field("eval_loss", min_length=1, description="the metric to optimize: a key of the records "
                           "in the runs' metrics.jsonl (eval_loss, loss, an eval metric)")
    direction: Literal["minimize", "maximize"] = Field("minimize", description="minimize for a loss, maximize for "
                                                       "a score")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    pruner: PrunerConfig = Field(default_factory=PrunerConfig)
    params: dict[str, ParamConfig] = Field(min_length=1, description="dotted config field -> its search space")
    enqueue: list[dict[str, Any]] = Field(default_factory=list, description="param sets tried first, in order "
                                          "(e.g. the base config's values as a baseline); a param left out is "
                                          "sampled")

    @model_validator(mode="after")
    def _check_sweep(self) -> SweepConfig:
        problems = [p for name, space in self.params.items() for p in space_problems(name, space)]
        for key in [*self.overrides, *self.params]:
            if key in SWEEP_SET or key == "output":
                problems.append(f"{key}: set by the sweep (each trial's run folder is OUTPUT/runs/<study>-trial-N); "
                                "choose the folder with output and the names with study")
        problems += [f"params.{key}: also in overrides; a field is either fixed or searched, not both"
                     for key in self.params if key in self.overrides]
        for index, entry in enumerate(self.enqueue):
            for key, value in entry.items():
                space = self.params.get(key)
                if space is None:
                    problems.append(f"enqueue[{index}].{key}: not one of params ({', '.join(self.params)})")
                elif not space_problems(key, space) and not space.contains(value):
                    problems.append(f"enqueue[{index}].{key}: {value!r} is outside params.{key} ({_shown(space)})")
        if len(self.enqueue) > self.trials:
            problems.append(f"enqueue has {len(self.enqueue)} param sets but trials is {self.trials}: raise trials")
        if problems:
            raise ValueError("\n".join(problems))  # load_sweep reports each line as its own problem
        return self

    @property
    def evaluates(self) -> bool:
        """Whether the objective is a metric of the eval passes (eval_loss, eval_*)."""
        return self.objective.startswith("eval_")


def _shown(space: ParamConfig) -> str:
    return f"choices {space.choices}" if space.kind == "categorical" else f"{space.low} to {space.high}"


@dataclass(frozen=True)
class SweepPlan:
    """A validated sweep file with what it leaves to defaults resolved: the base config's file, the study's
    name and the output folder (absolute)."""

    config: SweepConfig
    file: Path
    base: Path
    study: str
    output: Path

    def trial_tree(self, params: dict[str, Any], name: str | None = None, runs: Path | None = None
                   ) -> dict[str, Any]:
        """The base config's tree with the overrides and ``params`` set; ``name`` and ``runs`` (the parent
        folder) name the run folder (None: the base config's)."""
        tree = read_yaml(self.base)
        fixed: dict[str, Any] = {} if name is None else {"name": name, "output.name": None}
        if runs is not None:
            fixed["output.dir"] = str(runs)
        for key, value in {**self.config.overrides, **params, **fixed}.items():  # typed: set as given
            set_dotted(tree, key.split("."), value, key)
        return tree

    def trial_config(self, params: dict[str, Any], name: str | None = None, runs: Path | None = None) -> Config:
        """The validated training config of a trial (``ConfigError`` naming each problem)."""
        return build_config(self.trial_tree(params, name, runs), str(self.base), self.base.parent)


def load_sweep(path: Path, trials: int | None = None, parallel: int | None = None) -> SweepPlan:
    """Read and validate a sweep file (``trials`` and ``parallel``: the command's flags, which replace the file's)
    and every trial config it can make; a ``ConfigError`` lists every problem found."""
    tree = read_yaml(path)
    tree.update({key: value for key, value in (("trials", trials), ("parallel", parallel)) if value is not None})
    try:
        config = SweepConfig.model_validate(tree)
    except ValidationError as err:
        problems = [line for problem in format_validation_error(err, SweepConfig) for line in problem.split("\n")]
        raise ConfigError(problems, str(path)) from None
    base = (path.parent / config.base).expanduser()
    if not base.is_file():
        raise ConfigError([f"base: {config.base!r} does not exist (looked beside the sweep file: {base})"], str(path))
    study = config.study or path.stem
    if config.study is None and not _is_name(study):
        raise ConfigError([f"study: the file's name {study!r} is not a run name (letters, digits, . _ -); set "
                           "study"], str(path))
    output = Path(config.output or f"runs/sweeps/{study}").expanduser().resolve()
    plan = SweepPlan(config, path, base.resolve(), study, output)
    problems = trial_problems(plan)
    if problems:
        raise ConfigError(problems, str(path))
    return plan


def _is_name(text: str) -> bool:
    return re.fullmatch(NAME_PATTERN, text) is not None


def trial_problems(plan: SweepPlan) -> list[str]:
    """Build the trial configs the sweep can make and collect what the training config refuses: the base with
    the overrides; each param at both ends of its range or at each choice; each enqueued set."""
    try:
        fixed = plan.trial_config({})
    except ConfigError as err:
        what = f"base {plan.config.base}" + (" with the overrides" if plan.config.overrides else "")
        return [f"{what}: {problem}" for problem in err.problems]
    problems = eval_problems(plan.config, fixed)
    refused = set()
    for name, space in plan.config.params.items():
        for label, value in space.probes():
            found = _refused(plan, {name: value}, f"params.{name} at {label} {value!r}")
            problems += found
            refused.update([name] if found else [])
            if any("unknown field" in problem or "not a section" in problem for problem in found):
                break  # a path that does not exist fails the same way at every value
    for index, entry in enumerate(plan.config.enqueue):
        if not refused & entry.keys():
            params = {key: plan.config.params[key].typed(value) for key, value in entry.items()}
            problems += _refused(plan, params, f"enqueue[{index}]")
    return problems


def _refused(plan: SweepPlan, params: dict[str, Any], what: str) -> list[str]:
    """The training config's problems with ``params`` set, each naming ``what`` set them."""
    try:
        plan.trial_config(params)
    except ConfigError as err:
        return [f"{what}: {problem}" for problem in err.problems]
    return []


def eval_problems(config: SweepConfig, trial: Config) -> list[str]:
    """An eval objective needs eval data; pruning on it needs evals while training (training.eval_every)."""
    if not config.evaluates:
        return []
    if not (trial.data.eval or trial.data.eval_fraction):
        return [f"objective {config.objective}: the base config has no eval data; set data.eval or "
                "data.eval_fraction (in the base config or in overrides)"]
    if config.pruner.type != "none" and not trial.training.eval_every:
        return [f"pruner {config.pruner.type}: the trials report {config.objective} only at the end without "
                "training.eval_every; set it (in the base config or in overrides), or pruner: {type: none}"]
    return []
