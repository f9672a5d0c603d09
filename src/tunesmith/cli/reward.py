"""`tunesmith reward score RUN --file F [--out F]`: score rows with a trained reward model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("reward", help="use a reward model (a task: reward run)")
    actions = parser.add_subparsers(dest="action", required=True)
    score = actions.add_parser("score", help="score chat rows, or both sides of preference pairs")
    score.add_argument("run", help="a task: reward run folder")
    score.add_argument("--file", required=True, help="rows in any format tunesmith reads")
    score.add_argument("--out", type=Path, help="write one JSON line per row here (default: standard output)")
    score.add_argument("--device", default="auto")
    score.add_argument("--batch-size", type=int, default=8)
    score.add_argument("--max-seq-len", type=int, help="tokens per scored conversation (default: the run's "
                       "data.max_seq_len); a longer one loses the start of its prompt, never its reply")
    score.set_defaults(handler=run_score)


def run_score(args: argparse.Namespace) -> int:
    from tunesmith.errors import ConfigError
    from tunesmith.evaluation.reward import as_jsonl, score_file, summary_line
    from tunesmith.io import write_text_atomic
    from tunesmith.targets import load_target, resolve_target

    for flag, value in (("--batch-size", args.batch_size), ("--max-seq-len", args.max_seq_len)):
        if value is not None and value < 1:
            raise ConfigError([f"{flag} must be at least 1 (got {value})"], source="tunesmith reward score")
    target = resolve_target(args.run)
    if target.run is None:
        raise ConfigError([f"{args.run}: not a run folder; reward score takes a task: reward run"],
                          source="tunesmith reward score")
    max_seq_len = args.max_seq_len or target.config.data.max_seq_len
    model, tokenizer = load_target(target, args.device, head="score")
    scored = score_file(model.eval(), tokenizer, args.file, max_seq_len, args.batch_size)
    if args.out:
        write_text_atomic(args.out, as_jsonl(scored))
        print(summary_line(scored))
    else:  # the rows on standard output, the summary beside them on standard error
        print(as_jsonl(scored), end="")
        print(summary_line(scored), file=sys.stderr)
    return 0
