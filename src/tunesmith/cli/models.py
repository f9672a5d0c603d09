"""`tunesmith models prepare`: convert and cache the embedded default model."""

from __future__ import annotations

import argparse


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("models", help="manage models")
    actions = parser.add_subparsers(dest="action", required=True)
    prepare = actions.add_parser("prepare", help="convert the embedded SmolLM2-135M-Instruct GGUF to a cached "
                                                 "safetensors folder (also done on first use)")
    prepare.add_argument("--force", action="store_true", help="convert again even if cached")
    prepare.set_defaults(handler=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from tunesmith.models.load import prepare_embedded

    print(prepare_embedded(force=args.force))
    return 0
