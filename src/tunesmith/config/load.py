"""YAML file + dotted overrides -> a validated ``Config``, with every problem reported at once."""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tunesmith.config.schema import TASK_CONFIGS, TASK_SECTIONS, Config, parse_config
from tunesmith.config.names import DATA_SUFFIXES
from tunesmith.errors import ConfigError


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into its key path and a YAML-typed value.

    >>> parse_override("training.lr=1e-4")
    (['training', 'lr'], 0.0001)
    >>> parse_override("method.lora.target_modules=[q_proj, v_proj]")
    (['method', 'lora', 'target_modules'], ['q_proj', 'v_proj'])
    """
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. training.lr=1e-4"])
    value = yaml.safe_load(raw) if raw.strip() else ""
    # YAML 1.1 reads 1e-4 as a string; users mean a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    return key.strip().split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted key in a nested dict (creating levels as needed); returns the same dict.

    >>> apply_overrides({"training": {"lr": 1.0}}, ["training.lr=0.5", "method.type=full"])
    {'training': {'lr': 0.5}, 'method': {'type': 'full'}}
    """
    for item in overrides:
        keys, value = parse_override(item)
        set_dotted(tree, keys, value, f"override {item!r}")
    return tree


def set_dotted(tree: dict[str, Any], keys: list[str], value: Any, what: str) -> None:
    """Put ``value`` (as given: not parsed again) at the nested key path ``keys``, creating levels.

    >>> tree = {"method": {"type": "lora"}}; set_dotted(tree, ["method", "lora", "r"], 8, "x"); tree
    {'method': {'type': 'lora', 'lora': {'r': 8}}}
    """
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError([f"{what}: {'.'.join(keys[:depth + 1])} is {child!r}, not a section"])
        node = child
    node[keys[-1]] = value


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"])
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([f"{where}: not valid YAML ({getattr(err, 'problem', err)})"]) from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections, got {type(tree).__name__}"])
    return tree


def _model_at(loc: tuple[Any, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at ``loc`` (for 'did you mean' hints)."""
    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        for arg in (annotation, *typing.get_args(annotation)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                model = arg
                break
            inner = [a for a in typing.get_args(arg) if isinstance(a, type) and issubclass(a, BaseModel)]
            if inner:
                model = inner[0]
                break
        else:
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _dotted(loc: tuple[Any, ...]) -> str:
    """``('sources', 0, 'weight')`` -> ``sources[0].weight``."""
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")


def format_validation_error(err: ValidationError, root: type[BaseModel] | None = None) -> list[str]:
    """One line per problem: the dotted field, the value given, and what to do. ``root``: the model
    validated (default: a run config, whose errors start with the task's tag)."""
    problems = []
    for item in err.errors():
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        model = root
        if root is None and loc and loc[0] in TASK_CONFIGS:  # the discriminated union's tag: the task
            task, loc = loc[0], loc[1:]
            model = TASK_CONFIGS[task]
            if item["type"] == "extra_forbidden" and len(loc) == 1 and loc[0] in TASK_SECTIONS:
                owners = " and ".join(TASK_SECTIONS[loc[0]])
                problems.append(f"{loc[0]}: task {task} does not take a {loc[0]} section (it is for task {owners}); "
                                f"remove it, or set task: {TASK_SECTIONS[loc[0]][0]}")
                continue
        if item["type"] == "unknown_task":
            problems.append(f"task: {item['input'].get('task')!r} is invalid: {item['msg']}")
            continue
        field = _dotted(loc)
        if item["type"] == "extra_forbidden":
            model = _model_at(loc, model) if model is not None else None
            known = sorted(model.model_fields) if model else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"did you mean {_dotted(loc[:-1] + (close[0],))!r}?" if close else ""
            hint = hint or (f"known fields here: {', '.join(known)}" if known else "remove it")
            problems.append(f"{field}: unknown field (value {item['input']!r}); {hint}")
        elif item["type"] == "missing":
            problems.append(f"{field}: required field is missing; add it")
        elif not field or (item["type"] == "value_error" and isinstance(item["input"], dict)):
            # a check across fields: its message names the fields
            problems.append(item["msg"].removeprefix("Value error, "))
        else:
            message = item["msg"].removeprefix("Value error, ")
            problems.append(f"{field}: {item['input']!r} is invalid: {message}")
    return problems


def resolve_path(raw: str, config_dir: Path | None) -> Path | None:
    """A path as given (relative to the working folder), else relative to the config's folder."""
    path = Path(raw).expanduser()
    if path.is_absolute() or path.exists() or config_dir is None:
        return path if path.exists() else None
    beside = config_dir / path
    return beside if beside.exists() else None


def _resolve_files(config: Config, config_dir: Path | None) -> list[str]:
    problems = []
    entries = [(f"data.{split}[{index}]", dataset) for split in ("train", "eval")
               for index, dataset in enumerate(getattr(config.data, split))]
    if config.data.replay is not None:
        entries.append(("data.replay", config.data.replay))
    for label, dataset in entries:
        found = resolve_path(dataset.path, config_dir)
        if not dataset.path.lower().endswith(DATA_SUFFIXES):
            problems.append(f"{label}.path: {dataset.path!r} is not a data file; use one of {', '.join(DATA_SUFFIXES)}")
        elif found is None:
            where = "the working folder" + (f" or {config_dir}" if config_dir else "")
            problems.append(f"{label}.path: {dataset.path!r} does not exist (looked in {where})")
        else:
            dataset.path = str(found.resolve())
    template = config.model.chat_template
    if template and "{" not in template:
        found = resolve_path(template, config_dir)
        if found is None:
            problems.append(f"model.chat_template: {template!r} is neither Jinja text nor an existing file")
        else:
            config.model.chat_template = str(found.resolve())
    if isinstance(config.model.add_tokens, str):
        found = resolve_path(config.model.add_tokens, config_dir)
        if found is None:
            problems.append(f"model.add_tokens: {config.model.add_tokens!r} is not a file (give a list of tokens "
                            "or a text file with one token per line)")
        else:
            config.model.add_tokens = str(found.resolve())
    name = config.model.name_or_path
    if name.startswith((".", "/", "~")) or name.endswith(".gguf"):
        found = resolve_path(name, config_dir)
        if found is None:
            problems.append(f"model.name_or_path: {name!r} does not exist; give a local folder, a .gguf file, "
                            "'embedded', or a hub id")
        else:
            config.model.name_or_path = str(found.resolve())
    return problems


def build_config(tree: dict[str, Any], source: str | None = None, config_dir: Path | None = None) -> Config:
    """Validate a raw tree; raise ``ConfigError`` with every problem found."""
    try:
        config = parse_config(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err), source) from None
    problems = _resolve_files(config, config_dir)
    if problems:
        raise ConfigError(problems, source)
    return config


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``a.b=value`` overrides, validate, and resolve file paths."""
    path = Path(path)
    tree = apply_overrides(read_yaml(path), overrides or [])
    return build_config(tree, source=str(path), config_dir=path.parent)


def dump_config(config: Config) -> str:
    """The resolved config as YAML (what a run folder keeps). With training.batch_tokens auto, batch_size is
    left out: read back, a batch_size written in the config would mean rows (TrainingConfig's validator)."""
    tree = config.model_dump(mode="json")
    if tree.get("training", {}).get("batch_tokens") == "auto":
        del tree["training"]["batch_size"]
    return yaml.safe_dump(tree, sort_keys=False)
