"""`tunesmith runs list | show RUN | compare RUN1 RUN2 ...`: the run folders as tables, `--html` with
the loss curves overlaid."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("runs", help="list, show and compare run folders (tables; --html with loss curves)")
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="every run folder under --dir, newest first")
    listing.add_argument("--dir", type=Path, default=Path("runs"), help="the folder of runs (default: runs)")
    listing.add_argument("--html", type=Path, metavar="FILE", help="also write a page with every run's loss curve")
    listing.set_defaults(handler=run_list)
    show = actions.add_parser("show", help="one run: config, result, loss curves, evaluations, trackers")
    show.add_argument("run", type=Path)
    show.add_argument("--html", type=Path, metavar="FILE", help="also write a page with its loss curves")
    show.set_defaults(handler=run_show)
    compare = actions.add_parser("compare", help="runs side by side: the config fields that differ, results, "
                                                 "evaluations")
    compare.add_argument("runs", type=Path, nargs="+")
    compare.add_argument("--html", type=Path, metavar="FILE", help="also write a page with the loss curves overlaid")
    compare.set_defaults(handler=run_compare)


def _report(runs: list, out: Path | None) -> None:
    from tunesmith.runs import write_report

    if out is not None:
        print(f"wrote {write_report(runs, out)}")


def run_list(args: argparse.Namespace) -> int:
    from tunesmith.runs import find_runs, list_table

    runs = find_runs(args.dir)
    print(list_table(runs) if runs else f"no runs in {args.dir}")
    if runs:
        _report(runs, args.html)
    return 0


def run_show(args: argparse.Namespace) -> int:
    from tunesmith.runs import read_run, show_text

    run = read_run(args.run)
    print(show_text(run))
    _report([run], args.html)
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from tunesmith.runs import compare_rows, read_run, table

    runs = [read_run(path) for path in args.runs]
    print(table(compare_rows(runs)))
    _report(runs, args.html)
    return 0
