"""`tunesmith estimate CONFIG [--gpus N] [--gpu-memory 80GB] [--price-per-gpu-hour X] [--steps N]`: peak
memory per device, time and cost of a config before it runs, the alternatives that fit, and a
recommendation (docs: Estimate)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import re

from tunesmith.runs import table

GIB, MIB = 2 ** 30, 2 ** 20
COMPONENTS = ("weights", "4-bit constants", "LoRA adapters", "gradients", "optimizer state", "optimizer scratch",
              "activations", "logits and loss", "reference model", "generation KV cache", "FSDP gathered",
              "DDP buckets", "rollback snapshot", "runtime")
LOSSES = {"chunked": "chunked", "liger": "Liger's fused cross-entropy", "logits": "full logits",
          "transformers": "transformers' own", "labels": "log-probs at the labels", "score": "reward head"}


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("estimate", help="peak memory per device, time and cost of a config, and what fits",
                                 description="Estimate a training config before running it: per-device peak "
                                             "memory by component, time per step and for the run, GPU-hours and "
                                             "cost, the alternatives that fit and a recommendation. Reads the "
                                             "model's config.json only.")
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    parser.add_argument("--gpus", type=int, default=1, metavar="N", help="devices (default: 1)")
    parser.add_argument("--gpu-memory", default="80GB", metavar="SIZE",
                        help="memory per device: 80GB, 141GiB, 24G (GB and GiB both mean 2^30 bytes; default 80GB)")
    parser.add_argument("--price-per-gpu-hour", type=float, metavar="X", help="price of one device for an hour")
    parser.add_argument("--steps", type=int, metavar="N", help="optimizer steps (default: training.max_steps, "
                                                               "else epochs over the counted training rows)")
    parser.add_argument("--strategy", choices=["auto", "ddp", "fsdp", "zero2", "zero3"],
                        help="with --gpus > 1 (default: training.distributed; zero2, zero3: DeepSpeed's stages): "
                             "auto is DDP for adapter methods, FSDP2 for full fine-tuning that does not fit under "
                             "DDP")
    parser.add_argument("--row-tokens", type=float, metavar="N", help="mean tokens per row, for the time "
                                                                      "(default: data.max_seq_len)")
    parser.add_argument("--mfu", type=float, help="utilisation to assume instead of the stated model (0-1]")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak per device (default: 989, H100/H200)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(handler=run_estimate)


def parse_size(text: str) -> float:
    """Bytes of ``80GB``, ``80GiB``, ``80G``, ``512MB`` or a bare number of GB.

    >>> parse_size("80GB") == parse_size("80") == 80 * 2 ** 30
    True
    """
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([GMT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not found:
        raise ValueError(text)
    scale = {"": 2 ** 30, "G": 2 ** 30, "M": 2 ** 20, "T": 2 ** 40}[found.group(2).upper()]
    return float(found.group(1)) * scale


def _check_flags(args: argparse.Namespace) -> float:
    from tunesmith.errors import ConfigError

    problems = []
    try:
        memory = parse_size(args.gpu_memory)
    except ValueError:
        memory = 0.0
        problems.append(f"--gpu-memory {args.gpu_memory!r} is not a size; write it like 80GB or 141GiB")
    for flag, value in (("--gpus", args.gpus), ("--steps", args.steps), ("--row-tokens", args.row_tokens)):
        if value is not None and value < 1:
            problems.append(f"{flag} must be at least 1 (got {value})")
    if args.price_per_gpu_hour is not None and args.price_per_gpu_hour < 0:
        problems.append(f"--price-per-gpu-hour must not be negative (got {args.price_per_gpu_hour})")
    if args.mfu is not None and not 0 < args.mfu <= 1:
        problems.append(f"--mfu must be in (0, 1] (got {args.mfu})")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        problems.append(f"--peak-tflops must be positive (got {args.peak_tflops})")
    if problems:
        raise ConfigError(problems, source="tunesmith estimate")
    return memory


def run_estimate(args: argparse.Namespace) -> int:
    from tunesmith import estimate as model
    from tunesmith.config.load import load_config

    memory = _check_flags(args)
    config = load_config(args.config, args.overrides)
    arch = model.load_architecture(config.model)
    plan = model.plan_from_config(config, arch, args.gpus)
    chosen = args.strategy or model.strategy_of(config) or "auto"
    plan = dataclasses.replace(plan, mean_row_tokens=args.row_tokens,
                               strategy=model.auto_strategy(arch, plan, memory) if chosen == "auto"
                               else chosen if args.gpus > 1 else "single")
    budget = config.training.batch_tokens
    if budget == "auto":  # what a run on these GPUs would pick (recipes.base.batch_tokens_for)
        budget = None
        if plan.device == "cuda" and config.task not in ("grpo", "ppo", "online_dpo") and not config.data.replay:
            budget = model.fitting_batch_tokens(arch, plan, config.data.max_seq_len, memory)
        if budget:
            rows, seq_len = model.tokens_as_rows(budget, config.data.max_seq_len)
            plan = dataclasses.replace(plan, micro_batch=rows, seq_len=seq_len)
            print(f"training.batch_tokens auto: {budget:,} tokens per micro-batch on these GPUs", file=sys.stderr)
    steps = args.steps or model.count_steps(config, args.gpus, budget, args.row_tokens)
    rollouts = config.ppo.steps_per_batch if config.task == "ppo" else 1
    report = model.estimate(arch, plan, steps, memory, args.peak_tflops or model.PEAK_TFLOPS, args.mfu,
                            args.price_per_gpu_hour, rollouts)
    print(json.dumps(as_json(report), indent=2) if args.json else render(report))
    return 0


# ---- output ----


def _unit(peak: float) -> tuple[str, float]:
    """MiB for a peak under 4 GiB, GiB above."""
    return ("MiB", MIB) if peak < 4 * GIB else ("GiB", GIB)


def _size(value: float, unit: tuple[str, float]) -> str:
    return f"{value / unit[1]:,.0f}" if unit[0] == "MiB" else f"{value / unit[1]:,.2f}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, hours = seconds / 60, seconds / 3600
    return f"{minutes:.0f}m" if hours < 1 else f"{hours:.1f}h" if hours < 48 else f"{hours / 24:.1f}d"


def _describe(plan) -> str:
    accum = f" x {plan.grad_accum} accumulated" if plan.grad_accum > 1 else ""
    where = f"{plan.gpus} x {plan.strategy.upper()}" if plan.gpus > 1 else f"1 {plan.device}"
    return (f"{plan.task} {plan.method}, {where}, micro-batch {plan.micro_batch}{accum}, "
            f"checkpointing {'on' if plan.checkpointing else 'off'}, loss: {LOSSES[plan.loss]}")


def render(report) -> str:
    arch, written = report.arch, report.written
    memory, timing = written.memory, written.timing
    unit = _unit(memory.peak)
    lines = [f"model       {arch.model_type}: {arch.params / 1e9:.3g}B parameters, {arch.layers} layers, hidden "
             f"{arch.hidden}, vocab {arch.vocab:,}",
             f"as written  {_describe(written.plan)}", ""]
    parts = [["per device, at the peak", unit[0]]]
    parts += [[name, _size(memory.parts[name], unit)] for name in COMPONENTS if memory.parts.get(name)]
    parts.append([f"peak ({memory.moment})", _size(memory.peak, unit)])
    lines += [table(parts, numbers_right=True),
              f"activations: {_size(memory.activations_without_checkpointing, unit)} {unit[0]} "
              f"without checkpointing, {_size(memory.activations_with_checkpointing, unit)} {unit[0]} with it",
              f"{'fits' if written.fits else 'does NOT fit'} in {report.gpu_memory / GIB:,.0f} GiB per device", ""]
    cost = f", cost {timing.cost:,.2f}" if timing.cost is not None else ""
    lines += [f"time        {_duration(timing.seconds_per_step)} per step ({timing.tokens_per_step:,.0f} tokens, "
              f"{timing.flops_per_token / 1e9:.3g} GFLOP per token, utilisation {timing.mfu:.3g}), "
              f"{timing.steps:,} steps: {_duration(timing.seconds)}, {timing.gpu_hours:,.2f} GPU-hours{cost}", ""]
    rows = [["method", "strategy", "micro-batch", "accum", "ckpt", f"peak {unit[0]}", "fits", "per step", "run",
             "GPU-hours", *(["cost"] if timing.cost is not None else [])]]
    for option in report.options[:10]:
        plan, run = option.plan, option.timing
        rows.append([plan.method, plan.strategy, str(plan.micro_batch), str(plan.grad_accum),
                     "on" if plan.checkpointing else "off", _size(option.memory.peak, unit), "yes" if option.fits else "no",
                     _duration(run.seconds_per_step), _duration(run.seconds), f"{run.gpu_hours:,.2f}",
                     *([f"{run.cost:,.2f}"] if run.cost is not None else [])])
    lines += ["alternatives (same global batch; fitting first, then fastest)", table(rows, numbers_right=True), ""]
    best = report.recommended
    same = best is not None and best.plan == written.plan
    lines.append(f"recommended {_describe(best.plan)}: {_size(best.memory.peak, unit)} {unit[0]}, "
                 f"{_duration(best.timing.seconds)}{' (as written)' if same else ''}" if best
                 else "recommended nothing fits: more devices, a larger device, or a shorter data.max_seq_len")
    lines += [f"note        {line}" for line in report.notes]
    return "\n".join(lines + ["", "assumptions"] + [f"- {line}" for line in report.assumptions])


def as_json(report) -> dict:
    def option(entry) -> dict:
        return {"plan": dataclasses.asdict(entry.plan), "fits": entry.fits,
                "memory": {"peak_bytes": entry.memory.peak, "moment": entry.memory.moment,
                           "parts_bytes": entry.memory.parts, "moments_bytes": entry.memory.moments,
                           "activations_without_checkpointing_bytes": entry.memory.activations_without_checkpointing,
                           "activations_with_checkpointing_bytes": entry.memory.activations_with_checkpointing},
                "time": dataclasses.asdict(entry.timing)}

    return {"architecture": dataclasses.asdict(report.arch), "gpu_memory_bytes": report.gpu_memory,
            "as_written": option(report.written), "alternatives": [option(o) for o in report.options],
            "recommended": option(report.recommended) if report.recommended else None,
            "assumptions": report.assumptions, "notes": report.notes}
