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
    score.set_defaults(handler=run_score)


def run_score(args: argparse.Namespace) -> int:
    from tunesmith.io import write_text_atomic
    from tunesmith.recipes.reward import as_jsonl, load_reward_model, score_file, summary_line

    model, tokenizer, config = load_reward_model(args.run, args.device)
    scored = score_file(model, tokenizer, args.file, config.data.max_seq_len, args.batch_size)
    if args.out:
        write_text_atomic(args.out, as_jsonl(scored))
        print(summary_line(scored))
    else:  # the rows on standard output, the summary beside them on standard error
        print(as_jsonl(scored), end="")
        print(summary_line(scored), file=sys.stderr)
    return 0
