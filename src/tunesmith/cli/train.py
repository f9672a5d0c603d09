"""`tunesmith train CONFIG [key=value ...] [--resume] [--overwrite]`"""

from __future__ import annotations

import argparse

from tunesmith.config.load import load_config


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", help="train a model from a YAML config",
                                 description="Train from a YAML config; KEY=VALUE overrides use dotted keys "
                                             "(training.lr=1e-4 method.lora.r=8).")
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if config.task in ("dpo", "reward"):  # heavy imports only when training
        from tunesmith.recipes.dpo import run_pairs as run_task
    elif config.task == "grpo":
        from tunesmith.recipes.grpo import run_grpo as run_task
    elif config.task == "ppo":
        from tunesmith.recipes.ppo import run_ppo as run_task
    else:
        from tunesmith.recipes.sft import run_sft as run_task
    run_dir = run_task(config, resume=args.resume, overwrite=args.overwrite).run_dir
    use = f"tunesmith reward score {run_dir} --file ROWS" if config.task == "reward" else f"tunesmith chat {run_dir}"
    print(f"run folder: {run_dir}\nuse it: {use}")
    return 0
