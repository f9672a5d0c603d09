"""`tunesmith train CONFIG [key=value ...] [--resume] [--overwrite] [--nproc N [--nnodes M --node-rank I
--rdzv-endpoint HOST:PORT]]`"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from tunesmith.config.load import load_config
from tunesmith.errors import ConfigError

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
    launch = parser.add_argument_group("more than one process (torchrun underneath; docs: More than one GPU)")
    launch.add_argument("--nproc", type=int, metavar="N", help="processes on this machine (one per GPU)")
    launch.add_argument("--nnodes", type=int, default=1, metavar="N", help="machines (default 1)")
    launch.add_argument("--node-rank", type=int, metavar="I", help="this machine's number, 0 to nnodes-1")
    launch.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="where the machines meet (machine 0's address)")
    parser.set_defaults(handler=run)


def torchrun_command(args: argparse.Namespace) -> list[str]:
    """The torchrun command that runs this same `tunesmith train` in ``--nproc`` processes per machine."""
    if args.nproc < 1 or args.nnodes < 1:
        raise ConfigError([f"--nproc {args.nproc} and --nnodes {args.nnodes} must be 1 or more"])
    # torchrun passes these signals on to the processes (SIGUSR1 too: Slurm's --signal), and waits two minutes
    # for them to checkpoint and exit before it kills them (also the longest a crash of one process can leave
    # the others waiting in a collective).
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
               "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout=120"]
    if args.nnodes == 1:
        command.append("--standalone")
    else:
        if args.rdzv_endpoint is None or args.node_rank is None:
            raise ConfigError([f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT (machine 0's address) and "
                               "--node-rank on every machine"])
        command += [f"--nnodes={args.nnodes}", f"--node-rank={args.node_rank}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={args.rdzv_endpoint}"]
    command += ["-m", "tunesmith", "train", args.config, *args.overrides]
    return command + (["--resume"] if args.resume else []) + (["--overwrite"] if args.overwrite else [])


def run(args: argparse.Namespace) -> int:
    if args.nproc is not None and "LOCAL_RANK" not in os.environ:
        load_config(args.config, args.overrides)  # a bad config is refused here, not once per process
        command = torchrun_command(args)
        sys.stdout.flush()
        sys.stderr.flush()
        # torchrun takes this process's place, so that a scheduler's SIGTERM reaches it (it passes it on).
        os.execv(command[0], command)
    config = load_config(args.config, args.overrides)
    run_dir = recipe_for(config.task)(config, resume=args.resume, overwrite=args.overwrite).run_dir
    use = f"tunesmith reward score {run_dir} --file ROWS" if config.task == "reward" else f"tunesmith chat {run_dir}"
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one process says it
        print(f"run folder: {run_dir}\nuse it: {use}")
    return 0
