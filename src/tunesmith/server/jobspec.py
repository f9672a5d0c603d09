"""OpenAI's fine-tuning request -> the tunesmith config a job trains with.

OpenAI's fields map onto the config: ``method.type`` supervised -> ``task: sft``, dpo -> ``task: dpo``;
``n_epochs`` -> ``training.epochs``; ``batch_size`` -> ``training.batch_size``;
``learning_rate_multiplier`` x the server's learning rate -> ``training.lr``; ``beta`` ->
``preference.beta``; ``seed`` -> ``training.seed``; ``validation_file`` -> ``data.eval``. "auto"
takes the server's defaults (``JOB_DEFAULTS``, or the server's ``--job-defaults`` file).

tunesmith's own fields come through the extension field ``tunesmith`` (``extra_body={"tunesmith":
{"method.lora.r": 32, "training.max_steps": 100}}`` with the openai client; nested mappings work too)
or through ``metadata`` keys ``tunesmith.FIELD`` whose string values are read as YAML scalars. Only
fields that change how training goes may be set (``ALLOWED``): no path, no module to import, no output
folder: a job cannot read or run anything on the server that the server did not put there.
"""

from __future__ import annotations

import copy
import math
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunesmith.config.load import set_dotted
from tunesmith.errors import ConfigError
from tunesmith.config.schema import parse_config

# The config a job starts from; the request's fields and extensions are applied over it.
JOB_DEFAULTS: dict[str, Any] = {
    "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}},
    "data": {"max_seq_len": 1024},
    "training": {"scheduler": "cosine", "warmup_ratio": 0.05, "log_every": 1, "keep_last": 3},
}
SERVED_METHODS = ("lora", "dora", "qlora")  # their adapters load into the serving engine while it serves
DEFAULT_EPOCHS = 3
DEFAULT_BATCH_SIZE = 8
BASE_LR = {"sft": 2e-4, "dpo": 5e-5}  # x learning_rate_multiplier
DEFAULT_BETA = 0.1

# Dotted prefixes of the fields a request may set; FORBIDDEN wins over them.
ALLOWED = ("training.", "method.", "preference.", "eval.", "data.max_seq_len", "data.eval_fraction",
           "data.train_on_prompt", "data.empty_labels")
FORBIDDEN = ("training.distributed", "training.fsdp", "training.deepspeed", "method.quantization.")


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: Annotated[int, Field(ge=1, le=50)] | Literal["auto"] = "auto"
    batch_size: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0.0, le=100.0)] | Literal["auto"] = "auto"
    beta: Annotated[float, Field(gt=0.0, le=10.0)] | Literal["auto"] = "auto"


class MethodSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo"]
    supervised: MethodSettings | None = None
    dpo: MethodSettings | None = None


class JobRequest(BaseModel):
    """POST /v1/fine_tuning/jobs (OpenAI's fields, and ``tunesmith``)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    hyperparameters: Hyperparameters | None = None  # the older place for them; method's win
    method: Method | None = None
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = None
    tunesmith: dict[str, Any] | None = None

    def kind(self) -> Literal["supervised", "dpo"]:
        return self.method.type if self.method is not None else "supervised"

    def hyperparameters_in_force(self) -> Hyperparameters:
        if self.method is not None:
            settings = getattr(self.method, self.method.type)
            if settings is not None:
                return settings.hyperparameters
        return self.hyperparameters or Hyperparameters()


class RequestProblem(ValueError):
    """A request the server refuses: ``param`` is the field to name in OpenAI's error body."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def extensions(request: JobRequest) -> dict[str, Any]:
    """tunesmith's own fields of the request, as dotted key -> value (from ``tunesmith`` and the
    ``tunesmith.`` metadata keys); RequestProblem for a field a job may not set."""
    found: dict[str, Any] = {}
    for key, value in _flatten(request.tunesmith or {}).items():
        found[key] = value
    for key, text in (request.metadata or {}).items():
        if key.startswith("tunesmith."):
            try:
                found[key.removeprefix("tunesmith.")] = yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise RequestProblem(f"metadata[{key!r}]: not a YAML value ({err})", "metadata") from None
    for key in found:
        if not key.startswith(ALLOWED) or key.startswith(FORBIDDEN) or key in {p.rstrip(".") for p in FORBIDDEN}:
            raise RequestProblem(f"tunesmith.{key}: a job may not set this field; it may set the fields under "
                                 f"{', '.join(ALLOWED)} (no paths, modules or output folders)", "tunesmith")
    return found


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def build_config(request: JobRequest, job_id: str, base_model: str, train_path: str, train_rows: int,
                 eval_path: str | None, output_dir: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """The job's config tree, validated; RequestProblem naming the field when it is not valid."""
    task = "dpo" if request.kind() == "dpo" else "sft"
    hyper = request.hyperparameters_in_force()
    if task == "sft" and hyper.beta != "auto":
        raise RequestProblem("method.supervised.hyperparameters.beta: beta is a DPO hyperparameter", "method")
    tree = copy.deepcopy(defaults)
    tree.update(name=job_id, task=task)
    set_dotted(tree, ["model", "name_or_path"], base_model, "model")
    set_dotted(tree, ["data", "train"], [{"path": train_path}], "training_file")
    set_dotted(tree, ["output", "dir"], output_dir, "output")
    batch = DEFAULT_BATCH_SIZE if hyper.batch_size == "auto" else hyper.batch_size
    epochs = DEFAULT_EPOCHS if hyper.n_epochs == "auto" else hyper.n_epochs
    lr = tree.get("training", {}).get("lr") or BASE_LR[task]
    multiplier = 1.0 if hyper.learning_rate_multiplier == "auto" else hyper.learning_rate_multiplier
    steps_per_epoch = max(1, math.ceil(train_rows / batch))
    training = {"batch_size": batch, "epochs": epochs, "lr": lr * multiplier, "save_every": steps_per_epoch}
    if request.seed is not None:
        training["seed"] = request.seed
    for key, value in training.items():
        set_dotted(tree, ["training", key], value, "hyperparameters")
    if eval_path is not None:
        set_dotted(tree, ["data", "eval"], [{"path": eval_path}], "validation_file")
        set_dotted(tree, ["training", "eval_every"], steps_per_epoch, "validation_file")
    if task == "dpo":
        set_dotted(tree, ["preference", "beta"], DEFAULT_BETA if hyper.beta == "auto" else hyper.beta, "beta")
    for key, value in extensions(request).items():
        try:
            set_dotted(tree, key.split("."), value, f"tunesmith.{key}")
        except ConfigError as err:
            raise RequestProblem(f"tunesmith.{key}: {'; '.join(err.problems)}", "tunesmith") from None
    method = tree.get("method", {}).get("type", "lora")
    if method not in SERVED_METHODS:
        raise RequestProblem(f"tunesmith.method.type: {method!r}; the server fine-tunes with "
                             f"{', '.join(SERVED_METHODS)} (the adapters it serves live)", "tunesmith")
    try:
        parse_config(copy.deepcopy(tree))
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"] if not str(part).endswith("TaskConfig"))
        raise RequestProblem(f"the job's config is not valid: {field}: {first['msg']}", "tunesmith") from None
    return tree


def resolved_hyperparameters(request: JobRequest, config: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's hyperparameters as the job trains with them ("auto" resolved)."""
    hyper = request.hyperparameters_in_force()
    training = config["training"]
    values = {"n_epochs": training.get("epochs"), "batch_size": training.get("batch_size"),
              "learning_rate_multiplier": 1.0 if hyper.learning_rate_multiplier == "auto"
              else hyper.learning_rate_multiplier}
    if config["task"] == "dpo":
        values["beta"] = config.get("preference", {}).get("beta")
    return values
