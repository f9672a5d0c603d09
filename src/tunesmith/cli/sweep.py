"""`tunesmith sweep SWEEP.yaml [--trials N] [--parallel N]`: a hyperparameter search, each trial a training run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "sweep", help="search hyperparameters: Optuna trials of `tunesmith train`, pruned as they train",
        description="Run the trials of a sweep file (docs: Sweeps): each is the base training config with the "
                    "overrides and its sampled params, in its own run folder. The study is kept in "
                    "OUTPUT/study.db: running the command again goes on where it stopped, and --trials N adds "
                    "trials. Writes OUTPUT/best.yaml and OUTPUT/report.html.")
    parser.add_argument("config", help="a sweep YAML (see configs/sweeps/quickstart.yaml)")
    parser.add_argument("--trials", type=int, metavar="N", help="the study's total number of trials, over the "
                        "file's trials (raise it to add trials to a finished sweep)")
    parser.add_argument("--parallel", type=int, metavar="N", help="trainings at once, over the file's parallel "
                        "(default: one per GPU, one on a machine without)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from tunesmith.sweep import run_sweep, shown

    result = run_sweep(Path(args.config), trials=args.trials, parallel=args.parallel)
    counts = {state: sum(1 for t in result.trials if t.state.name == state) for state in ("COMPLETE", "PRUNED", "FAIL")}
    print(f"study {result.plan.study}: {len(result.trials)} trials ({counts['COMPLETE']} complete, "
          f"{counts['PRUNED']} pruned, {counts['FAIL']} failed)")
    print(f"report: {result.folder.report_file}")
    if result.best is None:
        print("error: no trial completed; the report and OUTPUT/logs/ say why each trial ended", file=sys.stderr)
        return 1
    print(f"best: trial {result.best.number}, {result.plan.config.objective} {result.best.value:.6g} "
          f"({shown(result.best.params)})")
    print(f"best config: {result.folder.best_file} (train it: tunesmith train {result.folder.best_file})")
    return 0
