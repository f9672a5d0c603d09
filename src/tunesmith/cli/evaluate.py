"""`tunesmith eval TARGET --data FILE`: metrics with confidence intervals, A/B against the base or
another model, drift against a baseline eval.json; eval.json and report.html. `--harness TASKS`:
EleutherAI's lm-evaluation-harness; harness.json. An evaluation of a tracked run also goes to its
MLflow run."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from tunesmith.rundir import HARNESS_FILE
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunesmith.config.commands import EvalCommandConfig

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


def base_of(target) -> str:
    """The base model of a run folder or an adapter folder (any kind of adapter)."""
    from tunesmith.errors import TunesmithError

    base = target.base_model
    if base is None:
        raise TunesmithError(f"--compare-base: {target.spec} is neither a run folder nor an adapter folder, so it has "
                             "no base model; name the other model with --compare OTHER")
    return base


def default_out(target, data: Path | None) -> Path:
    """RUN/eval-DATA (RUN/harness without data) for a run folder, else ./eval/TARGET-DATA (a registered
    version included: it is never written to)."""
    if target.run is not None and target.registered is None:
        return target.run.eval_dir(data)
    name = re.sub(r"[^\w.-]+", "_", target.registered or target.name).strip("_") or "model"
    return Path("eval") / f"{name}-{data.stem if data else 'harness'}"


def run(args: argparse.Namespace) -> int:
    from tunesmith.config.commands import EvalCommandConfig, validate_command

    flags = validate_command(EvalCommandConfig, args, "eval")  # every flag, before anything loads
    if flags.judge_url:
        import importlib.util

        from tunesmith.errors import ConfigError

        if importlib.util.find_spec("openai") is None:
            raise ConfigError(["the LLM judge talks to its endpoint with the openai package: pip install openai"],
                              source="tunesmith eval")
    from tunesmith.evaluation.judge import JudgeSettings
    from tunesmith.evaluation.run import EvalOptions, evaluate, summary_lines, write_outputs

    options = EvalOptions(metrics=flags.metrics, max_new_tokens=flags.max_new_tokens, max_seq_len=flags.max_seq_len,
                          batch_size=flags.batch_size, extract=flags.extract, normalise=flags.normalize,
                          pattern=flags.pattern, bootstrap=flags.bootstrap, seed=flags.seed, device=flags.device,
                          judge=JudgeSettings(flags.judge_url, flags.judge_model, flags.judge_key_env)
                          if flags.judge_url else None)
    from tunesmith.targets import resolve_target

    target = resolve_target(flags.target)  # looked at once for the whole command
    is_run = target.run is not None and target.registered is None  # a registered version is never written
    if flags.harness:
        status = _harness(flags, target)
        if flags.data is None:
            return status
    other = base_of(target) if flags.compare_base else flags.compare
    document = evaluate(target, flags.data, options, other=other, baseline=flags.baseline,
                        threshold=flags.threshold, limit=flags.limit)
    json_path, html_path = write_outputs(document, flags.out or default_out(target, flags.data))
    print("\n".join(summary_lines(document)))
    print(f"wrote {json_path} and {html_path}")
    if is_run:
        from tunesmith.tracking import log_evaluation

        log_evaluation(target.run.path, document, [json_path, html_path], f"eval/{flags.data.stem}")
    if "judge_error" in document.get("compare", {}):
        print(f"the judge failed: {document['compare']['judge_error']}", file=sys.stderr)
        return 1
    drifted = [k for k, v in document.get("drift", {}).get("metrics", {}).items() if v["flagged"]]
    if drifted:
        print(f"drift beyond {flags.threshold:.0%}: {', '.join(drifted)}")
        return 3 if flags.fail_on_drift else 0
    return 0


def _harness(flags: EvalCommandConfig, target) -> int:
    from tunesmith.evaluation.harness import HarnessOptions, harness_lines, run_harness

    options = HarnessOptions(tasks=flags.harness, num_fewshot=flags.num_fewshot, limit=flags.limit,
                             batch_size=flags.batch_size, max_new_tokens=flags.max_new_tokens,
                             chat_template=flags.chat_template, extract=flags.extract, normalise=flags.normalize,
                             device=flags.device)
    out = flags.out if flags.out and flags.data is None else default_out(target, None)
    document = run_harness(target, options, out)
    print("\n".join(harness_lines(document)))
    print(f"wrote {out / HARNESS_FILE}")
    if target.run is not None and target.registered is None:
        from tunesmith.tracking import log_evaluation

        log_evaluation(target.run.path, document, [out / HARNESS_FILE], "harness")
    return 0
