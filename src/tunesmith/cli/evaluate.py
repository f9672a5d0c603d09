"""`tunesmith eval TARGET --data FILE`: metrics with confidence intervals, A/B against the base or
another model, drift against a baseline eval.json; eval.json and report.html. `--harness TASKS`:
EleutherAI's lm-evaluation-harness; harness.json. An evaluation of a tracked run also goes to its
MLflow run."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

DEFAULT_METRICS = "loss,perplexity,rouge,bleu,chrf,exact_match"


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="evaluate a run or model on chat rows (A/B, drift, HTML report)")
    parser.add_argument("target", help="run folder, model or adapter folder, .gguf file, registry:NAME@ALIAS, "
                                           "'embedded' or hub id")
    parser.add_argument("--data", type=Path,
                        help="chat rows in any format tunesmith reads; each row's last assistant turn is the reference")
    parser.add_argument("--harness", metavar="TASKS",
                        help="comma-separated lm-eval tasks/groups, task .yaml files, or .jsonl files of chat rows "
                             "(each a local task scored by exact match; offline); needs lm-eval installed")
    parser.add_argument("--num-fewshot", type=int, help="--harness: few-shot examples per task (its default else)")
    parser.add_argument("--chat-template", action="store_true",
                        help="--harness: wrap prompts in the tokenizer's chat template (instruct models)")
    parser.add_argument("--metrics", default=DEFAULT_METRICS,
                        help="comma-separated: loss, perplexity, rouge (rouge1, rouge2, rougeL), bleu, chrf, "
                             f"exact_match, json_valid, regex_match (default: {DEFAULT_METRICS})")
    against = parser.add_mutually_exclusive_group()
    against.add_argument("--compare-base", action="store_true",
                         help="also evaluate the run's (or adapter's) base model on the same rows")
    against.add_argument("--compare", metavar="OTHER", help="also evaluate OTHER (any target) on the same rows")
    parser.add_argument("--judge-url", help="an OpenAI-compatible endpoint (…/v1) whose model judges the A/B "
                                            "replies pairwise, each row in both orders")
    parser.add_argument("--judge-model", help="the judge's model name at --judge-url")
    parser.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable with the judge's key")
    parser.add_argument("--baseline", type=Path, help="an earlier eval.json: flag metrics that moved (drift)")
    parser.add_argument("--threshold", type=float, default=0.05,
                        help="relative change that counts as drift (default 0.05: 5%%)")
    parser.add_argument("--fail-on-drift", action="store_true", help="exit with status 3 when a metric drifted")
    parser.add_argument("--extract", default="none",
                        help="what exact_match compares: none (the whole reply), number (GSM8K's '#### n', else the "
                             "last number), or a regex (its first group)")
    parser.add_argument("--normalize", default="case,punct,articles,whitespace",
                        help="exact_match normalisation steps, comma-separated, or none")
    parser.add_argument("--pattern", help="the regex of regex_match (searched in the reply; anchor with ^...$)")
    parser.add_argument("--limit", type=int, help="the first N rows only")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-seq-len", type=int, default=2048, help="tokens per row for loss and perplexity")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95%% intervals (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, help="folder for eval.json and report.html, or harness.json (default: "
                                                 "RUN/eval-DATA or RUN/harness for a run folder, else "
                                                 "./eval/TARGET-DATA or ./eval/TARGET-harness)")
    parser.set_defaults(handler=run)


def base_of(target: str) -> str:
    """The base model of a run folder or an adapter folder."""
    import json

    from tunesmith.errors import TunesmithError
    from tunesmith.models.inference import run_config_of

    config = run_config_of(target)
    if config is not None:
        return config.model.name_or_path
    adapter = Path(target).expanduser() / "adapter_config.json"
    if adapter.is_file():
        return json.loads(adapter.read_text())["base_model_name_or_path"]
    raise TunesmithError(f"--compare-base: {target} is neither a run folder nor an adapter folder, so it has no "
                         "base model; name the other model with --compare OTHER")


def default_out(target: str, data: Path | None) -> Path:
    """RUN/eval-DATA (RUN/harness without data) for a run folder, else ./eval/TARGET-DATA."""
    path = Path(target).expanduser()
    if (path / "config.yaml").is_file():
        return path / (f"eval-{data.stem}" if data else "harness")
    name = re.sub(r"[^\w.-]+", "_", path.name or target).strip("_") or "model"
    return Path("eval") / f"{name}-{data.stem if data else 'harness'}"


def run(args: argparse.Namespace) -> int:
    from tunesmith.errors import ConfigError
    from tunesmith.evaluation import metrics as m
    from tunesmith.evaluation.judge import JudgeSettings
    from tunesmith.evaluation.run import EvalOptions, evaluate, summary_lines, write_outputs

    problems = []
    if args.data is None and not args.harness:
        problems.append("name what to evaluate on: --data FILE (chat rows) and/or --harness TASKS (lm-eval)")
    if args.harness and (args.compare or args.compare_base or args.baseline or args.judge_url):
        problems.append("--harness scores one model; --compare, --compare-base, --baseline and the judge are for "
                        "--data alone (run --harness on each model)")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        problems.append("--num-fewshot must be at least 0")
    try:
        names = m.parse_metrics(args.metrics)
    except ValueError as err:
        problems.append(f"--metrics: {err}")
        names = []
    steps = tuple(s.strip() for s in args.normalize.split(",") if s.strip() and s.strip() != "none")
    unknown = [s for s in steps if s not in m.NORMALISATIONS]
    if unknown:
        problems.append(f"--normalize: unknown step(s) {', '.join(unknown)}; known: {', '.join(m.NORMALISATIONS)}")
    for flag, value in (("--extract", args.extract if args.extract not in ("none", "number") else None),
                        ("--pattern", args.pattern)):
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                problems.append(f"{flag}: not a valid regex ({err})")
    if bool(args.judge_url) != bool(args.judge_model):
        problems.append("--judge-url and --judge-model go together")
    if args.judge_url and not (args.compare or args.compare_base):
        problems.append("the LLM judge compares two models: add --compare OTHER or --compare-base")
    if args.judge_url:
        import importlib.util

        if importlib.util.find_spec("openai") is None:
            problems.append("the LLM judge talks to its endpoint with the openai package: pip install openai")
    if args.fail_on_drift and not args.baseline:
        problems.append("--fail-on-drift needs --baseline")
    if "regex_match" in names and not args.pattern:
        problems.append("--metrics regex_match needs --pattern")
    for flag, value, low in (("--limit", args.limit, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--batch-size", args.batch_size, 1), ("--bootstrap", args.bootstrap, 0)):
        if value is not None and value < low:
            problems.append(f"{flag} must be at least {low}")
    if problems:
        raise ConfigError(problems, source="tunesmith eval")
    options = EvalOptions(metrics=names, max_new_tokens=args.max_new_tokens, max_seq_len=args.max_seq_len,
                          batch_size=args.batch_size, extract=args.extract, normalise=steps, pattern=args.pattern,
                          bootstrap=args.bootstrap, seed=args.seed, device=args.device,
                          judge=JudgeSettings(args.judge_url, args.judge_model, args.judge_key_env)
                          if args.judge_url else None)
    is_run = (Path(args.target).expanduser() / "config.yaml").is_file()
    if args.harness:
        status = _harness(args, is_run, steps)
        if args.data is None:
            return status
    other = base_of(args.target) if args.compare_base else args.compare
    document = evaluate(args.target, args.data, options, other=other, baseline=args.baseline,
                        threshold=args.threshold, limit=args.limit)
    json_path, html_path = write_outputs(document, args.out or default_out(args.target, args.data))
    print("\n".join(summary_lines(document)))
    print(f"wrote {json_path} and {html_path}")
    if is_run:
        from tunesmith.tracking import log_evaluation

        log_evaluation(Path(args.target), document, [json_path, html_path], f"eval/{Path(args.data).stem}")
    if "judge_error" in document.get("compare", {}):
        print(f"the judge failed: {document['compare']['judge_error']}", file=sys.stderr)
        return 1
    drifted = [k for k, v in document.get("drift", {}).get("metrics", {}).items() if v["flagged"]]
    if drifted:
        print(f"drift beyond {args.threshold:.0%}: {', '.join(drifted)}")
        return 3 if args.fail_on_drift else 0
    return 0


def _harness(args: argparse.Namespace, is_run: bool, normalise: tuple[str, ...]) -> int:
    from tunesmith.evaluation.harness import HarnessOptions, harness_lines, run_harness

    options = HarnessOptions(tasks=[t.strip() for t in args.harness.split(",") if t.strip()],
                             num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens, chat_template=args.chat_template,
                             extract=args.extract, normalise=normalise, device=args.device)
    out = args.out if args.out and args.data is None else default_out(args.target, None)
    document = run_harness(args.target, options, out)
    print("\n".join(harness_lines(document)))
    print(f"wrote {out / 'harness.json'}")
    if is_run:
        from tunesmith.tracking import log_evaluation

        log_evaluation(Path(args.target), document, [out / "harness.json"], "harness")
    return 0
