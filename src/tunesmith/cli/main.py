"""Entry point: parse, dispatch to one command module, print user errors without a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from tunesmith import __version__, quiet
from tunesmith.cli import chat, config, data, estimate, evaluate, export, methods, models, registry, reward, runs, \
    serve, server, sweep, train
from tunesmith.errors import ConfigError, DataError, RunStopped, TunesmithError

COMMANDS = (train, chat, evaluate, runs, registry, data, export, serve, server, methods, config, models, reward,
            estimate, sweep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune open-weight language models.")
    parser.add_argument("--version", action="version", version=f"tunesmith {__version__}")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    loudness.add_argument("-v", "--verbose", action="store_true",
                          help="also the known third-party warnings, notices and progress bars that are filtered "
                               "by default (tunesmith.quiet lists them)")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    quiet.install(verbose=args.verbose)  # before any third-party import
    # KEY=VALUE overrides may also come after flags (`train c.yaml --resume training.lr=1e-4`).
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.handler(args) or 0
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunStopped as err:
        print(f"{'stopped' if err.status == 'preempted' else 'error'}: {err}", file=sys.stderr)
        return err.exit_code
    except TunesmithError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
