"""`tunesmith train CONFIG [key=value ...] [--resume] [--overwrite]`"""

from __future__ import annotations

import argparse
import importlib

from tunesmith.config.load import load_config

# task -> the recipe that trains it ("module:function"), imported only when training (heavy imports).
RECIPES = {
    "sft": "tunesmith.recipes.sft:run_sft",
    "pretrain": "tunesmith.recipes.sft:run_sft",
    "dpo": "tunesmith.recipes.dpo:run_dpo",
    "reward": "tunesmith.recipes.reward:run_reward",
    "grpo": "tunesmith.recipes.grpo:run_grpo",
    "ppo": "tunesmith.recipes.ppo:run_ppo",
}


def recipe_for(task: str):
    """The training function of ``task``'s recipe."""
    module, function = RECIPES[task].split(":")
    return getattr(importlib.import_module(module), function)


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
    run_dir = recipe_for(config.task)(config, resume=args.resume, overwrite=args.overwrite).run_dir
    use = f"tunesmith reward score {run_dir} --file ROWS" if config.task == "reward" else f"tunesmith chat {run_dir}"
    print(f"run folder: {run_dir}\nuse it: {use}")
    return 0
