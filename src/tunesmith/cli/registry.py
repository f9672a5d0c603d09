"""`tunesmith registry add RUN --name NAME [--alias A] | list | promote NAME VERSION ALIAS`: versions of
finished runs in MLflow's model registry; `registry:NAME@ALIAS` then names one anywhere a model goes."""

from __future__ import annotations

import argparse
from pathlib import Path

URI_HELP = "the MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)"


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("registry", help="register finished runs as model versions (MLflow registry); "
                                                  "use them as registry:NAME@ALIAS")
    actions = parser.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="a finished run -> a new version of NAME, with lineage and evaluations")
    add.add_argument("run", type=Path)
    add.add_argument("--name", required=True, help="the registered model's name (letters, digits, . _ -)")
    add.add_argument("--alias", help="also point this alias (staging, production...) at the new version")
    add.add_argument("--description")
    add.add_argument("--registry-uri", help="the MLflow store (default: the one the run was tracked in, else "
                                            "$MLFLOW_TRACKING_URI, else RUN/../mlflow.db)")
    add.set_defaults(handler=run_add)
    listing = actions.add_parser("list", help="every version: aliases, run, lineage, evaluations")
    listing.add_argument("--registry-uri", help=URI_HELP)
    listing.set_defaults(handler=run_list)
    promote = actions.add_parser("promote", help="point ALIAS at VERSION of NAME")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("alias")
    promote.add_argument("--registry-uri", help=URI_HELP)
    promote.set_defaults(handler=run_promote)


def run_add(args: argparse.Namespace) -> int:
    from tunesmith import registry

    version, uri = registry.add(args.run, args.name, args.alias, args.registry_uri, args.description)
    alias = f", alias {args.alias}" if args.alias else ""
    print(f"registered {args.run} as {args.name} version {version.version}{alias} in {uri}\n"
          f"use it: tunesmith chat registry:{args.name}{'@' + args.alias if args.alias else '/' + str(version.version)}")
    if uri != registry.registry_uri():
        print(f"(registry:... names are looked up in {registry.registry_uri()}; for this store set "
              f"MLFLOW_TRACKING_URI={uri})")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from tunesmith import registry
    from tunesmith.runs import table

    rows = registry.versions(args.registry_uri)
    print(table(registry.version_lines(rows)) if rows else "no registered models")
    return 0


def run_promote(args: argparse.Namespace) -> int:
    from tunesmith import registry

    before = registry.promote(args.name, args.version, args.alias, args.registry_uri)
    moved = f" (was version {before})" if before and before != args.version else ""
    print(f"{args.name}@{args.alias} -> version {args.version}{moved}")
    return 0
