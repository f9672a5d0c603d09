"""`tunesmith config validate FILE [key=value ...]`: every problem at once."""

from __future__ import annotations

import argparse

from tunesmith.config.load import dump_config, load_config


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("config", help="check configs")
    actions = parser.add_subparsers(dest="action", required=True)
    validate = actions.add_parser("validate", help="validate a config; print every problem with its fix")
    validate.add_argument("config")
    validate.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    validate.add_argument("--show", action="store_true", help="print the resolved config")
    validate.set_defaults(handler=run_validate)


def run_validate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tunesmith.config.load import read_yaml

    if "methods" in read_yaml(Path(args.config)):  # a `tunesmith methods compare` file
        from tunesmith.compare import load_compare_config

        _, per_method = load_compare_config(Path(args.config))
        print(f"{args.config}: valid ({len(per_method)} methods: {', '.join(per_method)})")
        return 0
    config = load_config(args.config, args.overrides)
    if args.show:
        print(dump_config(config), end="")
    print(f"{args.config}: valid")
    return 0
