"""`tunesmith methods compare CONFIG`: train several methods on the same data, budget and seed."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("methods", help="compare fine-tuning methods")
    actions = parser.add_subparsers(dest="action", required=True)
    compare = actions.add_parser("compare", help="train each listed method on the same data, budget and seed; "
                                                 "write a table (compare.md, compare.json) and a report with "
                                                 "plots (compare.html)")
    compare.add_argument("config", help="a compare YAML (see configs/compare.yaml)")
    compare.set_defaults(handler=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    from tunesmith.compare import compare_methods

    out, _, table = compare_methods(Path(args.config))
    print(table)
    print(f"report: {out / 'compare.html'}")
    return 0
