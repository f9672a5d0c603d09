"""`tunesmith data validate|stats|preview|convert|dedup|split|mix|synth|chunk`"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tunesmith.config.schema import DatasetConfig
from tunesmith.data.formats import FORMATS
from tunesmith.errors import DataError

FORMAT_CHOICES = ["auto", *FORMATS]


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("data", help="validate, inspect and reshape datasets")
    actions = parser.add_subparsers(dest="action", required=True)

    def action(name: str, help_text: str, handler, model: bool = False) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        if model:
            sub.add_argument("--model", default="embedded", help="tokenizer and chat template to use")
            sub.add_argument("--max-seq-len", type=int, default=1024)
        sub.set_defaults(handler=handler)
        return sub

    sub = action("validate", "every problem of a file in one pass: file:line, field, fix", run_validate)
    sub.add_argument("file")
    sub.add_argument("--format", choices=FORMAT_CHOICES, default="auto")
    sub.add_argument("--model", help="also check lengths and trainable tokens with this tokenizer and template")
    sub.add_argument("--max-seq-len", type=int, default=1024)
    sub.add_argument("--strict", action="store_true", help="warnings fail too")
    sub.add_argument("--json", action="store_true", help="a machine-readable report on stdout")

    sub = action("stats", "rows, tokens, turns, truncation, a length histogram", run_stats, model=True)
    sub.add_argument("file")
    sub.add_argument("--plot", help="write an HTML report with the histogram to this file")
    sub.add_argument("--json", action="store_true")

    sub = action("preview", "the exact training text, with the trained span marked", run_preview, model=True)
    sub.add_argument("file")
    sub.add_argument("-n", type=int, default=3, help="rows to show")
    sub.add_argument("--train-on-prompt", action="store_true")

    sub = action("convert", "convert between formats; says what a format cannot carry", run_convert)
    sub.add_argument("input")
    sub.add_argument("output")
    sub.add_argument("--to", required=True, choices=["openai", "alpaca", "sharegpt", "preference"])

    sub = action("dedup", "remove exact and (with --near) near-duplicate rows", run_dedup)
    sub.add_argument("input")
    sub.add_argument("output")
    sub.add_argument("--near", type=float, help="MinHash Jaccard threshold, e.g. 0.9")

    sub = action("split", "reproducible train/val/test split, no row in two splits", run_split)
    sub.add_argument("input")
    sub.add_argument("--val", type=float, default=0.05)
    sub.add_argument("--test", type=float, default=0.05)
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--stratify", help="a field to split proportionally by")
    sub.add_argument("--near", type=float, help="keep near-duplicates in one split (no leakage)")
    sub.add_argument("--out-dir", help="default: beside the input")

    sub = action("mix", "several datasets into one, with weights, caps and a provenance column", run_mix)
    sub.add_argument("config", help="YAML: output, seed, sources[path, weight, max_rows, category_*]")

    sub = action("synth", "self-instruct augmentation from seed tasks", run_synth)
    sub.add_argument("--seeds", required=True)
    sub.add_argument("--n", type=int, default=200)
    sub.add_argument("--out", required=True)
    source = sub.add_mutually_exclusive_group(required=True)
    source.add_argument("--endpoint", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    source.add_argument("--model", help="a local model (run folder, model folder, 'embedded')")
    sub.add_argument("--endpoint-model", default="default", help="the model name sent to the endpoint")
    sub.add_argument("--api-key")
    sub.add_argument("--temperature", type=float, default=0.8)
    sub.add_argument("--max-new-tokens", type=int, default=256)
    sub.add_argument("--near", type=float, default=0.7, help="drop rows this similar to a seed or a kept row")
    sub.add_argument("--max-chars", type=int, default=2000)
    sub.add_argument("--seed", type=int, default=0)

    sub = action("chunk", "raw text -> chunks of the model's length, with overlap; packing stats", run_chunk,
                 model=True)
    sub.add_argument("input")
    sub.add_argument("output")
    sub.add_argument("--overlap", type=int, default=0)


def _tokenizer(name: str):
    from tunesmith.models.inference import tokenizer_for
    from tunesmith.targets import resolve_target

    return tokenizer_for(resolve_target(name))


def _read_valid(path: str, fmt: str = "auto", refuse_errors: bool = True):
    """Canonical rows of a file. A file with errors is refused (exit 2), so that a transform never
    drops rows silently; inspection commands (refuse_errors=False) go on with the valid rows."""
    from tunesmith.data.build import DataReport, read_canonical

    report = DataReport()
    rows = read_canonical(DatasetConfig(path=path, format=fmt), report)
    if report.errors and refuse_errors:
        raise DataError(report.errors, consequence="nothing was written",
                        hint=f"fix them first (tunesmith data validate {path})")
    for error in report.errors:
        print(f"skipped: {error}", file=sys.stderr)
    return rows


def run_validate(args: argparse.Namespace) -> int:
    from tunesmith.data.inspect import validate_file

    tokenizer = _tokenizer(args.model) if args.model else None
    report = validate_file(args.file, args.format, tokenizer, args.max_seq_len)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        for finding in report.findings:
            print(f"{finding.severity}: {finding}")
        print(f"{args.file}: {report.rows} valid rows ({', '.join(sorted(set(report.formats.values())))}), "
              f"{len(report.errors)} errors, {len(report.warnings)} warnings")
    failed = report.errors or (args.strict and report.warnings)
    return 2 if failed else 0


def run_stats(args: argparse.Namespace) -> int:
    from tunesmith.data.inspect import compute_stats, html_report, terminal_histogram
    from tunesmith.io import write_text_atomic

    stats = compute_stats(_read_valid(args.file, refuse_errors=False), _tokenizer(args.model), args.max_seq_len)
    if args.json:
        print(json.dumps(stats.as_json(), indent=2))
    else:
        print(f"{args.file}: {stats.rows} rows, {stats.training_tokens_per_epoch:,} training tokens per epoch at "
              f"max_seq_len {stats.max_seq_len}; {100 * stats.truncated_share:.1f}% truncated; "
              f"{100 * stats.system_prompt_share:.1f}% with a system prompt")
        print(f"{'tokens':>9} {'min':>7} {'median':>7} {'p95':>7} {'max':>7} {'mean':>8}")
        for name, values in [*stats.tokens.items(), ("turns", stats.turns)]:
            print(f"{name:>9} " + " ".join(f"{values[k]:>7}" for k in ("min", "median", "p95", "max"))
                  + f" {values['mean']:>8}")
        print("row length (tokens):\n" + terminal_histogram(stats.lengths))
    if args.plot:
        write_text_atomic(Path(args.plot), html_report(stats, args.file))
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def run_preview(args: argparse.Namespace) -> int:
    from tunesmith.data.inspect import render_preview
    from tunesmith.data.preference import as_chat

    tokenizer = _tokenizer(args.model)
    color = sys.stdout.isatty()
    for item in _read_valid(args.file, refuse_errors=False)[: args.n]:
        row = as_chat(item.row)
        print(f"--- {item.where}")
        print(render_preview(tokenizer, row, args.max_seq_len, color, args.train_on_prompt))
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from tunesmith.data.transform import convert_row, write_jsonl

    converted, skipped = [], []
    for item in _read_valid(args.input):
        try:
            converted.append(convert_row(item.row, args.to))
        except ValueError as err:
            skipped.append(f"{item.where}: not converted: {err}")
    for line in skipped:
        print(line, file=sys.stderr)
    write_jsonl(Path(args.output), converted)
    print(f"wrote {len(converted)} rows to {args.output} ({args.to}); {len(skipped)} rows could not be carried")
    return 0


def run_dedup(args: argparse.Namespace) -> int:
    from tunesmith.data.transform import dedup_rows, write_jsonl

    rows = _read_valid(args.input)
    result = dedup_rows(rows, args.near)
    for cluster in result.removed:
        print(f"kept {cluster['kept']}, removed {', '.join(cluster['removed'])}")
    write_jsonl(Path(args.output), [r.raw for r in result.kept])
    print(f"wrote {len(result.kept)} of {len(rows)} rows to {args.output}; "
          f"{len(rows) - len(result.kept)} removed in {len(result.removed)} clusters")
    return 0


def run_split(args: argparse.Namespace) -> int:
    from tunesmith.data.transform import duplicate_clusters, row_text, split_assignments, write_jsonl

    rows = _read_valid(args.input)
    groups = duplicate_clusters([row_text(r.row) for r in rows], args.near) if args.near else None
    strata = [str((r.raw or {}).get(args.stratify, "")) for r in rows] if args.stratify else None
    assignment = split_assignments(len(rows), args.val, args.test, args.seed, groups, strata)
    source = Path(args.input)
    stem = source.name
    for suffix in (".gz", ".jsonl", ".json", ".csv", ".parquet"):
        stem = stem.removesuffix(suffix)
    folder = Path(args.out_dir) if args.out_dir else source.parent
    # Only known suffixes are stripped, so STEM.train.jsonl can never be the input itself.
    targets = {name: folder / f"{stem}.{name}.jsonl" for name in ("train", "val", "test")}
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in targets.items():  # all three, so no stale split from an earlier run stays
        chosen = [r.raw for r, a in zip(rows, assignment) if a == name]
        write_jsonl(target, chosen)
        print(f"{target}: {len(chosen)} rows")
    return 0


def run_mix(args: argparse.Namespace) -> int:
    from tunesmith.config.load import format_validation_error, read_yaml, resolve_path
    from tunesmith.config.schema import MixConfig
    from tunesmith.data.transform import SourcePlan, mix_sources, write_jsonl
    from tunesmith.errors import ConfigError
    from pydantic import ValidationError

    config_path = Path(args.config)
    try:
        config = MixConfig.model_validate(read_yaml(config_path))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, MixConfig), args.config) from None
    plans = []
    for source in config.sources:
        found = resolve_path(source.path, config_path.parent)
        if found is None:
            raise ConfigError([f"sources: {source.path!r} does not exist"], args.config)
        plans.append(SourcePlan(_read_valid(str(found), source.format), source.weight, source.max_rows,
                                source.category_column, source.category_cap, source.category_min,
                                source.name or found.name))
    mixed = mix_sources(plans, config.seed)
    output = Path(config.output) if Path(config.output).is_absolute() else config_path.parent / config.output
    rows = [{**(row.raw if isinstance(row.raw, dict) else {"value": row.raw}), "_source": f"{name}:{row.line}"}
            for name, row in mixed]
    write_jsonl(output, rows)
    for plan in plans:
        print(f"{plan.name}: {len(plan.chosen)} rows from {len(plan.rows)}")
    print(f"wrote {len(rows)} rows to {output}")
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from tunesmith.data.synth import endpoint_generator, read_seed_tasks, synthesize
    from tunesmith.generate.sample import local_generator
    from tunesmith.data.transform import write_jsonl

    seeds = read_seed_tasks(args.seeds)
    if args.endpoint:
        generate = endpoint_generator(args.endpoint, args.endpoint_model, args.temperature, args.max_new_tokens,
                                      args.api_key)
        name = f"endpoint:{args.endpoint} model={args.endpoint_model}"
    else:
        from tunesmith.targets import load_target

        model, tokenizer = load_target(args.model)
        generate = local_generator(model, tokenizer, args.temperature, args.max_new_tokens, args.seed)
        name = f"local:{args.model}"
    result = synthesize(seeds, generate, args.n, name, near=args.near, max_chars=args.max_chars, seed=args.seed,
                        sampling={"temperature": args.temperature, "max_new_tokens": args.max_new_tokens})
    write_jsonl(Path(args.out), result.rows)
    dropped = ", ".join(f"{count} {reason}" for reason, count in result.dropped.most_common()) or "none"
    print(f"wrote {len(result.rows)} rows to {args.out} after {result.attempts} attempts; dropped: {dropped}")
    if result.stopped:
        print(f"error: {result.stopped}", file=sys.stderr)
        return 1
    return 0


def run_chunk(args: argparse.Namespace) -> int:
    from tunesmith.data.transform import chunk_ids, packing_stats, write_jsonl

    tokenizer = _tokenizer(args.model)
    chunks, lengths = [], []
    for item in _read_valid(args.input, "text"):
        ids = tokenizer(item.row["text"], add_special_tokens=False)["input_ids"]
        for number, window in enumerate(chunk_ids(ids, args.max_seq_len, args.overlap)):
            chunks.append({"text": tokenizer.decode(window), "_source": f"{item.where}#{number}"})
            lengths.append(len(window))
    write_jsonl(Path(args.output), chunks)
    stats = packing_stats(lengths, args.max_seq_len)
    print(f"wrote {len(chunks)} chunks ({stats['tokens']:,} tokens) to {args.output}")
    print(f"padded one per sequence: {stats['padded_sequences']} sequences, "
          f"{100 * stats['padding_share_unpacked']:.1f}% padding; packed: {stats['packed_sequences']} sequences, "
          f"{100 * stats['padding_share_packed']:.1f}% padding")
    return 0
