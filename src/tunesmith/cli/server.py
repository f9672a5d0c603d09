"""`tunesmith server [--model embedded] [--root DIR] [--port 8000] ...` and
`tunesmith server key create NAME | list | revoke ID`: OpenAI's fine-tuning API on this machine."""

from __future__ import annotations

import argparse

DEFAULT_ROOT = "tunesmith-server"


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "server", help="OpenAI's fine-tuning API (files, fine-tuning jobs) and the fine-tuned models served",
        description="A fine-tuning service: OpenAI's /v1/files and /v1/fine_tuning/jobs, jobs run as `tunesmith "
                    "train` processes (one per GPU, one at a time without), the fine-tuned models served at "
                    "/v1/chat/completions as soon as they are made. Create an API key first: `tunesmith server "
                    "key create NAME`.")
    _storage_flags(parser)
    parser.add_argument("--model", default="embedded", help="the base model jobs fine-tune and the server serves "
                        "(a model folder, registry:NAME@ALIAS or 'embedded')")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, help="trainings at once (default: one per GPU, one without a GPU)")
    parser.add_argument("--ray", metavar="ADDRESS", help="run the jobs on this Ray cluster's machines (pip install "
                        "'tunesmith[ray]'; the root must be on storage every machine shares)")
    parser.add_argument("--max-upload-mb", type=int, default=512, help="the largest file an upload may be")
    parser.add_argument("--job-defaults", metavar="YAML", help="a config tree every job starts from (method, "
                        "training settings); the request's fields apply over it")
    serving = parser.add_argument_group("serving the models (as tunesmith serve)")
    serving.add_argument("--max-batch-size", type=int, default=32)
    serving.add_argument("--max-concurrency", type=int, default=64)
    serving.add_argument("--max-tokens", type=int, default=256, help="when a request sets none")
    serving.add_argument("--device", default="auto")
    serving.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto")
    serving.add_argument("--request-timeout", type=float, default=300.0, metavar="SECONDS")
    serving.add_argument("--shutdown-timeout", type=float, default=60.0, metavar="SECONDS",
                         help="on SIGTERM/Ctrl-C: how long requests and trainings (checkpointing) may take to stop")
    parser.set_defaults(handler=run)
    sub = parser.add_subparsers(dest="server_command")
    key = sub.add_parser("key", help="API keys: create, list, revoke")
    key_commands = key.add_subparsers(dest="key_command", required=True)
    create = key_commands.add_parser("create", help="a new key, printed once (only its hash is stored)")
    create.add_argument("name", help="whose key it is (shown in `key list`)")
    listing = key_commands.add_parser("list", help="the keys: id, name, created, revoked")
    revoke = key_commands.add_parser("revoke", help="the key stops working at once")
    revoke.add_argument("id", help="the key's id (key-...), from `key list`")
    for command in (create, listing, revoke):
        _storage_flags(command)
        command.set_defaults(handler=run_key)


def _storage_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default=argparse.SUPPRESS,
                        help=f"the storage root: uploaded files, jobs, run folders, the SQLite store "
                             f"(default: ./{DEFAULT_ROOT})")
    parser.add_argument("--db", default=argparse.SUPPRESS, metavar="URL",
                        help="an SQLAlchemy URL for the job store, e.g. postgresql://... (default: SQLite in "
                             "the root)")


def _store(args: argparse.Namespace):
    from tunesmith.server.storage import Storage
    from tunesmith.server.store import Store

    storage = Storage(getattr(args, "root", DEFAULT_ROOT))
    return Store(getattr(args, "db", None) or storage.database_url)


def run_key(args: argparse.Namespace) -> int:
    import datetime

    store = _store(args)
    if args.key_command == "create":
        ident, key = store.create_key(args.name)
        print(f"{key}\n(key {ident} for {args.name}: shown this once; only its hash is stored)")
    elif args.key_command == "list":
        for row in store.keys():
            when = datetime.datetime.fromtimestamp(row.created_at, datetime.UTC).strftime("%Y-%m-%d %H:%M")
            print(f"{row.id}  {row.name}  created {when}" + ("  REVOKED" if row.revoked_at else ""))
    elif not store.revoke_key(args.id):
        print(f"error: no live key {args.id}")
        return 1
    else:
        print(f"revoked {args.id}")
    return 0


def run(args: argparse.Namespace) -> int:
    from tunesmith.config.commands import ServerCommandConfig, validate_command

    args.root = getattr(args, "root", DEFAULT_ROOT)
    args.db = getattr(args, "db", None)
    flags = validate_command(ServerCommandConfig, args, "server")  # every flag, before anything loads
    import uvicorn

    from tunesmith.server.app import build_server

    app = build_server(flags)
    print(f"tunesmith server: {flags.model} on http://{flags.host}:{flags.port}/v1, storage {app.state.root}",
          flush=True)
    uvicorn.run(app, host=flags.host, port=flags.port, log_level="warning",
                timeout_graceful_shutdown=flags.shutdown_timeout)
    return 0
