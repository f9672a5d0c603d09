"""`tunesmith methods compare CONFIG`: several methods, the same data, budget and seed, one table.

Each method trains in its own process (`tunesmith train`), so its peak memory is its own; the
results come from each run's summary.json and metrics.jsonl. Overrides may change the method and
its learning rate, not what makes the comparison fair (data, steps, batch, seed).
"""

from __future__ import annotations

import html
import json
import logging
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from transformers import AutoConfig

from tunesmith.config.load import build_config, dump_config, format_validation_error, read_yaml, resolve_path, \
    set_dotted
from tunesmith.config.schema import CompareConfig, Config
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.io import write_text_atomic
from tunesmith.models.load import resolve_model_source
from tunesmith.plots import bar_chart, line_chart
from tunesmith.rundir import RunDir

log = logging.getLogger(__name__)

# What a method may change. Everything else (data, template, vocabulary, steps, batch, seed, fast-path
# switches, eval and early stopping) is the shared budget.
OVERRIDABLE = ("method.", "regularization.", "model.attention_dropout", "training.lr", "training.layer_decay",
               "training.weight_decay", "training.scheduler", "training.warmup_steps", "training.warmup_ratio",
               "training.optimizer", "training.adam_betas", "training.adam_eps", "training.max_grad_norm",
               "training.gradient_checkpointing")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested or dotted override keys as dotted keys.

    >>> _flatten({"method": {"type": "lora", "lora": {"r": 8}}, "training.lr": 0.1})
    {'method.type': 'lora', 'method.lora.r': 8, 'training.lr': 0.1}
    """
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat



@dataclass
class MethodResult:
    name: str
    method: str
    trainable_parameters: int
    total_parameters: int
    trainable_percent: float
    peak_memory_mb: float
    tokens_per_s: float
    final_train_loss: float | None
    final_eval_loss: float | None
    size_on_disk_mb: float


def load_compare_config(path: Path) -> tuple[CompareConfig, dict[str, Config]]:
    """The compare config and each method's full training config, all validated before any training."""
    try:
        compare = CompareConfig.model_validate(read_yaml(path))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, CompareConfig), str(path)) from None
    base_path = resolve_path(compare.base, path.parent)
    if base_path is None:
        raise ConfigError([f"base: {compare.base!r} does not exist"], str(path))
    problems, configs = [], {}
    names = [entry.name for entry in compare.methods]
    if len(set(names)) != len(names):
        problems.append(f"methods: names repeat ({', '.join(sorted({n for n in names if names.count(n) > 1}))}); "
                        "each method needs its own run folder")
    for index, entry in enumerate(compare.methods):
        overrides = _flatten(entry.overrides)
        unfair = [key for key in overrides if not key.startswith(OVERRIDABLE)]
        if unfair:
            problems.append(f"methods[{index}] ({entry.name}): {', '.join(unfair)} would change what the methods "
                            "share (data, template, vocabulary, budget, batch, seed); set it in the base config")
            continue
        tree = read_yaml(base_path)
        fixed = {"name": entry.name, "output.dir": str((path.parent / compare.output).resolve()), "output.name": None}
        if compare.max_steps:
            fixed["training.max_steps"] = compare.max_steps
        for key, value in {**overrides, **fixed}.items():  # typed values: a string stays the string it was
            set_dotted(tree, key.split("."), value, f"methods[{index}] ({entry.name}) {key}")
        try:
            configs[entry.name] = build_config(tree, f"{path} methods[{index}]", base_path.parent)
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(problems, str(path))
    return compare, configs


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def _result(name: str, run_dir: Path) -> MethodResult:
    run = RunDir(run_dir)
    summary = run.summary()
    if summary is None:
        raise TunesmithError(f"{run_dir}: the run wrote no summary (it did not finish)")
    trainable, total = summary["trainable_parameters"], summary["total_parameters"]
    return MethodResult(name, summary["method"], trainable, total, round(100 * trainable / max(total, 1), 4),
                        summary.get("peak_memory_mb", 0.0),
                        round(summary["tokens_seen"] / max(summary["train_seconds"], 1e-9), 1),
                        summary["final_train_loss"], summary["final_eval_loss"], round(_size_mb(run.model_dir), 3))


def lora_arithmetic(config: Config, rank: int) -> list[str]:
    """The LoRA parameter count of a 4096 x 4096 layer at r=16 (the usual textbook example) and of
    this model's attention projection at the compared rank."""
    lines = []
    for label, rows, cols, r in (("a 4096 x 4096 layer", 4096, 4096, 16),) + _model_projection(config, rank):
        full, lora = rows * cols, r * (rows + cols)
        lines.append(f"{label} at r={r}: LoRA trains r x (in + out) = {lora:,} parameters instead of "
                     f"{full:,} ({100 * (1 - lora / full):.1f}% fewer)")
    return lines


def _model_projection(config: Config, rank: int) -> tuple[tuple[str, int, int, int], ...]:
    try:
        folder, gguf = resolve_model_source(config.model)
        model_config = AutoConfig.from_pretrained(folder, gguf_file=gguf) if gguf else AutoConfig.from_pretrained(
            folder)
    except (OSError, ValueError, TunesmithError):
        return ()
    hidden = model_config.hidden_size
    head_dim = getattr(model_config, "head_dim", None) or hidden // model_config.num_attention_heads
    return ((f"this model's q_proj ({model_config.num_attention_heads * head_dim} x {hidden})",
             model_config.num_attention_heads * head_dim, hidden, rank),)


def _table(results: list[MethodResult]) -> str:
    head = ("| method | trainable | % | peak memory MB | tokens/s | train loss | eval loss | on disk MB |\n"
            "|---|---|---|---|---|---|---|---|\n")

    def loss(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"
    return head + "".join(
        f"| {r.name} ({r.method}) | {r.trainable_parameters:,} | {r.trainable_percent:.3g} | {r.peak_memory_mb:,.0f}"
        f" | {r.tokens_per_s:,.0f} | {loss(r.final_train_loss)} | {loss(r.final_eval_loss)} | {r.size_on_disk_mb:,.2f} |\n"
        for r in results)


def _curves(out: Path, names: list[str]) -> dict[str, list[tuple[float, float]]]:
    curves = {}
    for name in names:
        records = RunDir(out / name).metrics()
        curves[name] = [(r["step"], r["loss"]) for r in records if "loss" in r]
    return curves


def write_report(out: Path, results: list[MethodResult], explanation: list[str]) -> None:
    table = _table(results)
    write_text_atomic(out / "compare.json", json.dumps([asdict(r) for r in results], indent=2) + "\n")
    write_text_atomic(out / "compare.md", table + "\n" + "\n".join(f"- {line}" for line in explanation) + "\n")
    names = [r.name for r in results]
    charts = [bar_chart("trainable parameters (%)", names, [r.trainable_percent for r in results], "%"),
              bar_chart("peak memory (MB)", names, [r.peak_memory_mb for r in results]),
              bar_chart("tokens/s", names, [r.tokens_per_s for r in results]),
              bar_chart("final eval loss", names, [r.final_eval_loss for r in results]),
              bar_chart("size on disk (MB)", names, [r.size_on_disk_mb for r in results]),
              line_chart("training loss", _curves(out, names))]
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(cell.strip())}</td>" for cell in line.strip("|").split("|"))
                   + "</tr>" for line in table.splitlines()[2:])
    heads = "".join(f"<th>{html.escape(c.strip())}</th>" for c in table.splitlines()[0].strip("|").split("|"))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>tunesmith methods compare</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.2em .8em;text-align:right}}svg{{margin:1em 0}}</style>
</head><body><h1>Methods compared on the same data, budget and seed</h1>
<table><tr>{heads}</tr>{rows}</table><ul>{"".join(f"<li>{html.escape(x)}</li>" for x in explanation)}</ul>
{"".join(charts)}</body></html>
"""
    write_text_atomic(out / "compare.html", page)


def compare_methods(path: Path) -> tuple[Path, list[MethodResult], str]:
    """Train every method of the compare config in turn; returns (output folder, results, table)."""
    compare, configs = load_compare_config(path)
    out = (path.parent / compare.output).resolve()
    (out / "configs").mkdir(parents=True, exist_ok=True)
    results = []
    for index, (name, config) in enumerate(configs.items(), start=1):
        config_file = out / "configs" / f"{name}.yaml"
        write_text_atomic(config_file, dump_config(config))
        log.info("[%d/%d] %s: training %s", index, len(configs), name, config.method.type)
        code = subprocess.call([sys.executable, "-m", "tunesmith", "train", str(config_file), "--overwrite"])
        if code != 0:
            raise TunesmithError(f"methods compare: the {name} run failed (exit {code}); its config is "
                                 f"{config_file}")
        results.append(_result(name, out / name))
    lora = next((c for c in configs.values() if c.method.type in ("lora", "dora", "qlora")), None)
    rank = lora.method.lora.r if lora else 16
    explanation = lora_arithmetic(next(iter(configs.values())), rank)
    write_report(out, results, explanation)
    return out, results, _table(results) + "\n" + "\n".join(explanation)
