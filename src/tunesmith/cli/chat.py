"""`tunesmith chat TARGET [--prompt P]`: one-shot, or interactive without --prompt."""

from __future__ import annotations

import argparse
import sys


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("chat", help="chat with a run, a model folder, an adapter, a GGUF file or "
                                             "'embedded'")
    parser.add_argument("target", help="run folder, model or adapter folder, .gguf file, registry:NAME@ALIAS, "
                                           "'embedded' or hub id")
    parser.add_argument("--prompt", help="one message; print the reply and exit")
    parser.add_argument("--system", help="a system message")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", default="auto")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from tunesmith.generate.sample import SamplingConfig, generate_reply
    from tunesmith.targets import load_target

    model, tokenizer = load_target(args.target, args.device)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    history = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        print(generate_reply(model, tokenizer, history + [{"role": "user", "content": args.prompt}], sampling))
        return 0
    print("chat: /reset clears the history, /exit or Ctrl-D leaves", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        reply = generate_reply(model, tokenizer, history, sampling, stream=True)
        history.append({"role": "assistant", "content": reply})
