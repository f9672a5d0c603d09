"""The flags of `tunesmith eval`, `export` and `serve` as typed models, validated once, first thing in
each command, before any model loads. One field per flag, named as argparse's dest; argparse alone
holds the defaults, so every field is required. A problem names the flag, the value and the fix:

    --max-new-tokens: 0 is invalid: Input should be greater than or equal to 1

and every problem is reported at once, the rules across flags (``conflicts``) with the rest.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from tunesmith.config.names import (EXPORT_DTYPES, EXPORT_TARGETS, GENERATION_METRICS, GGUF_QUANTS,
                                    LIKELIHOOD_METRICS, METRIC_ALIASES, NORMALISATIONS)
from tunesmith.config.schema import ModelConfig, StrictModel
from tunesmith.errors import ConfigError

Device = Annotated[str, AfterValidator(ModelConfig._check_device)]  # the run config's rule: auto|cpu|cuda[:N]|mps
Count = Annotated[int, Field(ge=1)]


def parse_metrics(text: str) -> list[str]:
    """``--metrics`` as a list of known names, aliases expanded, order kept.

    >>> parse_metrics("loss, rouge,exact_match")
    ['loss', 'rouge1', 'rouge2', 'rougeL', 'exact_match']
    """
    names: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        for name in METRIC_ALIASES.get(item, (item,)):
            if name not in LIKELIHOOD_METRICS + GENERATION_METRICS:
                known = ", ".join(LIKELIHOOD_METRICS + GENERATION_METRICS + tuple(METRIC_ALIASES))
                raise ValueError(f"unknown metric {item!r}; known: {known}")
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError("no metrics named")
    return names


def split_list(text: str) -> list[str]:
    """A comma-separated flag value as its items.

    >>> split_list("f16, q8_0,")
    ['f16', 'q8_0']
    """
    return [item.strip() for item in text.split(",") if item.strip()]


def _custom(kind: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(kind, "{message}", {"message": message})


def _invalid(message: str) -> PydanticCustomError:
    """A problem whose message names the bad value (or its bad items) itself."""
    return _custom("flag_value", message)


def _check_regex(value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as err:
            raise _invalid(f"not a valid regex: {value!r} ({err})") from None
    return value


Regex = Annotated[str, AfterValidator(_check_regex)]


class CommandConfig(StrictModel):
    """A command's flags. ``conflicts`` holds the rules across flags; they are checked on the flags
    as given, so that they are reported together with the problems of single flags."""

    def conflicts(self) -> list[str]:
        """The rules across flags, one message each (naming the flags). ``self`` holds the values as
        argparse gave them, not yet validated: a comma-separated flag is still its text."""
        return []

    @model_validator(mode="wrap")
    @classmethod
    def _check_together(cls, data: Any, handler: Any) -> CommandConfig:
        complete = isinstance(data, dict) and cls.model_fields.keys() <= data.keys()
        found = cls.model_construct(**data).conflicts() if complete else []
        errors = [{"type": _custom("flags", message), "loc": (), "input": data} for message in found]
        try:
            config = handler(data)
        except ValidationError as err:
            if not errors:
                raise
            # pydantic's own error types rebuild from their names; ours must be rebuilt as custom errors
            rebuilt = [{**e, "type": _custom(e["type"], e["msg"])} if e["type"] == "flag_value" else e
                       for e in err.errors()]
            raise ValidationError.from_exception_data(err.title, [*rebuilt, *errors]) from None
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return config


class EvalCommandConfig(CommandConfig):
    """`tunesmith eval`."""

    target: str
    data: Path | None
    harness: list[str] | None = Field(description="the tasks, from a comma-separated --harness")
    num_fewshot: int | None = Field(ge=0)
    chat_template: bool
    metrics: list[str] = Field(description="the metric names, aliases expanded, from a comma-separated --metrics")
    compare_base: bool
    compare: str | None
    judge_url: str | None
    judge_model: str | None
    judge_key_env: str = Field(min_length=1)
    baseline: Path | None
    threshold: float = Field(gt=0)
    fail_on_drift: bool
    extract: Regex = Field(description="none, number, or a regex (the two names compile as regexes too)")
    normalize: tuple[str, ...] = Field(description="the normalisation steps, from a comma-separated --normalize")
    pattern: Regex | None
    limit: Count | None
    max_new_tokens: Count
    max_seq_len: Count
    batch_size: Count
    bootstrap: int = Field(ge=0)
    seed: int = Field(ge=0)
    device: Device
    out: Path | None

    @field_validator("harness", mode="before")
    @classmethod
    def _split_harness(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not split_list(value):
                raise _invalid(f"{value!r} names no task; give lm-eval tasks, task .yaml or .jsonl files")
            return split_list(value)
        return value

    @field_validator("metrics", mode="before")
    @classmethod
    def _parse_metrics(cls, value: Any) -> Any:
        try:
            return parse_metrics(value if isinstance(value, str) else ",".join(value))
        except ValueError as err:
            raise _invalid(str(err)) from None

    @field_validator("normalize", mode="before")
    @classmethod
    def _parse_normalize(cls, value: Any) -> Any:
        steps = tuple(s for s in (split_list(value) if isinstance(value, str) else value) if s != "none")
        unknown = [s for s in steps if s not in NORMALISATIONS]
        if unknown:
            raise _invalid(f"unknown step(s) {', '.join(unknown)}; known: {', '.join(NORMALISATIONS)}, or none")
        return steps

    def conflicts(self) -> list[str]:
        problems = []
        if self.data is None and not self.harness:
            problems.append("name what to evaluate on: --data FILE (chat rows) and/or --harness TASKS (lm-eval)")
        if self.harness and (self.compare or self.compare_base or self.baseline or self.judge_url):
            problems.append("--harness scores one model; --compare, --compare-base, --baseline and the judge are "
                            "for --data alone (run --harness on each model)")
        if bool(self.judge_url) != bool(self.judge_model):
            problems.append("--judge-url and --judge-model go together")
        if self.judge_url and not (self.compare or self.compare_base):
            problems.append("the LLM judge compares two models: add --compare OTHER or --compare-base")
        if self.fail_on_drift and not self.baseline:
            problems.append("--fail-on-drift needs --baseline")
        if "regex_match" in _metric_names(self.metrics) and not self.pattern:
            problems.append("--metrics regex_match needs --pattern")
        return problems


def _metric_names(metrics: str | list[str]) -> list[str]:
    """The metrics as given (a flag's text, or names), or none when --metrics itself is invalid."""
    try:
        return parse_metrics(metrics) if isinstance(metrics, str) else metrics
    except ValueError:
        return []


class ExportCommandConfig(CommandConfig):
    """`tunesmith export`."""

    target: str
    to: Literal[EXPORT_TARGETS]  # type: ignore[valid-type]
    out: str = Field(min_length=1)
    dtype: Literal[tuple(EXPORT_DTYPES)]  # type: ignore[valid-type]
    quant: list[str] = Field(description="the GGUF types, from a comma-separated --quant")
    no_parity: bool

    @field_validator("quant", mode="before")
    @classmethod
    def _parse_quant(cls, value: Any) -> Any:
        quants = split_list(value) if isinstance(value, str) else value
        unknown = [q for q in quants if q not in GGUF_QUANTS]
        if unknown or not quants:
            what = f"unknown GGUF type(s) {', '.join(unknown)}" if unknown else f"{value!r} names no GGUF type"
            raise _invalid(f"{what}; choose from {', '.join(GGUF_QUANTS)}, comma-separated")
        return quants


class ServeCommandConfig(CommandConfig):
    """`tunesmith serve`."""

    target: str
    adapter: dict[str, str] = Field(description="name -> run or adapter folder, from the NAME=RUN --adapter flags")
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    api_key: str | None = Field(min_length=1)
    engine: Literal["batched", "sequential", "vllm"]
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    vllm_python: str | None = Field(default=None, min_length=1)
    vllm_arg: list[str] = Field(default_factory=list)
    vllm_log: str | None = Field(default=None, min_length=1)
    max_batch_size: Count
    prefix_cache_mb: int = Field(ge=0, description="MiB for cached prompt prefixes; 0 turns prefix caching off")
    max_concurrency: Count
    max_body_bytes: Count
    max_tokens: Count
    device: Device
    request_timeout: float = Field(gt=0.0, description="seconds a request may take, queueing included")
    shutdown_timeout: float = Field(ge=0.0, description="seconds in-flight requests may finish on shutdown")

    @field_validator("adapter", mode="before")
    @classmethod
    def _parse_adapters(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return value
        adapters: dict[str, str] = {}
        bad, twice = [], []
        for item in value:
            name, sep, path = item.partition("=")
            if not sep or not name.strip() or not path.strip():
                bad.append(repr(item))
            elif name.strip() in adapters:
                twice.append(repr(name.strip()))
            else:
                adapters[name.strip()] = path.strip()
        problems = [f"{', '.join(bad)}: expected NAME=RUN_OR_ADAPTER_FOLDER"] if bad else []
        problems += [f"name {', '.join(twice)} given twice; give each adapter its own name"] if twice else []
        if problems:
            raise _invalid("; ".join(problems))
        return adapters


def flag_of(field: str) -> str:
    """The flag of a field (argparse's dest): ``max_new_tokens`` -> ``--max-new-tokens``."""
    return "--" + field.replace("_", "-")


def format_flag_errors(err: ValidationError) -> list[str]:
    """One line per problem, naming the flag and the value: messages that name the bad value or its
    bad items themselves (``flag_value``) stand alone; the others are told what was given."""
    problems = []
    for item in err.errors():
        if not item["loc"]:  # a rule across flags: its message names them
            problems.append(item["msg"])
            continue
        flag, value = flag_of(str(item["loc"][0])), item["input"]
        shown = repr(value) if isinstance(value, str) else value
        if item["type"] == "flag_value":
            problems.append(f"{flag}: {item['msg']}")
        elif item["type"] == "missing":
            problems.append(f"{flag}: missing (the command's parser and its CommandConfig disagree)")
        elif item["type"] == "extra_forbidden":
            problems.append(f"{flag}: not a flag of this command (value {shown})")
        else:
            problems.append(f"{flag}: {shown} is invalid: {item['msg'].removeprefix('Value error, ')}")
    return problems


C = TypeVar("C", bound=CommandConfig)


class ServerCommandConfig(CommandConfig):
    """`tunesmith server`."""

    model: str = Field(min_length=1, description="the base model jobs fine-tune and the server serves")
    root: str = Field(min_length=1, description="the storage root: files, jobs, runs and the SQLite store")
    db: str | None = Field(min_length=1, description="an SQLAlchemy URL for the job store (default: SQLite in "
                           "the root)")
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    workers: int | None = Field(ge=1, description="trainings at once (default: one per GPU, one without)")
    ray: str | None = Field(min_length=1, description="a Ray cluster's address: jobs run on its machines")
    max_upload_mb: Count
    job_defaults: str | None = Field(min_length=1)
    max_batch_size: Count
    max_concurrency: Count
    max_tokens: Count
    device: Device
    dtype: Literal["auto", "bfloat16", "float16", "float32"]
    request_timeout: float = Field(gt=0.0)
    shutdown_timeout: float = Field(ge=0.0)

    def conflicts(self) -> list[str]:
        problems = []
        if self.ray is not None and self.workers is not None:
            problems.append("--workers and --ray: with Ray, the cluster's GPUs (or machines) decide how many jobs "
                            "run at once; give one of them")
        if self.job_defaults is not None and not Path(self.job_defaults).is_file():
            problems.append(f"--job-defaults: {self.job_defaults} is not a file")
        return problems


def validate_command(model: type[C], args: argparse.Namespace, command: str) -> C:
    """The command's flags (``args``' entries that are fields of ``model``) as a validated ``model``;
    else a ``ConfigError`` from ``tunesmith COMMAND`` with one line per problem, each naming its flag."""
    flags = {name: value for name, value in vars(args).items() if name in model.model_fields}
    try:
        return model.model_validate(flags)
    except ValidationError as err:
        raise ConfigError(format_flag_errors(err), source=f"tunesmith {command}") from None
