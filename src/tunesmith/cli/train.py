"""`tunesmith train CONFIG [key=value ...] [--resume] [--overwrite] [--nproc N [--nnodes M --node-rank I
--rdzv-endpoint HOST:PORT]]`"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import time

from tunesmith.config.load import load_config
from tunesmith.config.schema import Config
from tunesmith.errors import ConfigError
from tunesmith.io import die_with_parent
from tunesmith.rundir import RunDir

# task -> the recipe that trains it ("module:function"), imported only when training (heavy imports).
RECIPES = {
    "sft": "tunesmith.recipes.sft:run_sft",
    "pretrain": "tunesmith.recipes.sft:run_sft",
    "dpo": "tunesmith.recipes.dpo:run_dpo",
    "reward": "tunesmith.recipes.reward:run_reward",
    "grpo": "tunesmith.recipes.grpo:run_grpo",
    "ppo": "tunesmith.recipes.ppo:run_ppo",
    "distill": "tunesmith.recipes.distill:run_distill",
    "online_dpo": "tunesmith.recipes.online_dpo:run_online_dpo",
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


def launch(command: list[str], config: Config) -> int:
    """Run torchrun and exit as the run ended: torchrun exits 1 whenever a process did not exit 0, so a run
    that was preempted (143, 130 for Ctrl-C) or diverged (1) is read from the status.json it wrote in this
    launch. The stop signals a scheduler sends this process (SIGTERM, Slurm's SIGUSR1) and Ctrl-C are passed
    on to torchrun, which passes them on to the processes; torchrun has its own process group, so Ctrl-C in a
    terminal reaches it once, from here. A signal that comes while torchrun starts is passed on once it has."""
    status_file = RunDir.of(config).status_file
    started = time.time()
    child: subprocess.Popen | None = None
    pending: list[int] = []

    def forward(number: int, _frame: object) -> None:
        if child is None:
            pending.append(number)
        else:
            child.send_signal(number)

    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    previous = {s: signal.signal(s, forward) for s in forwarded}
    try:
        child = subprocess.Popen(command, process_group=0,
                                 preexec_fn=die_with_parent if sys.platform == "linux" else None)
        for number in pending:
            child.send_signal(number)
        code = child.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if code != 0 and status_file.is_file() and status_file.stat().st_mtime >= started:
        try:
            recorded = json.loads(status_file.read_text()).get("exit_code")
        except (OSError, ValueError):
            recorded = None  # unreadable: torchrun's own code stands
        if isinstance(recorded, int):
            return recorded
    return code if code >= 0 else 128 - code  # killed by a signal: as a shell reports it


def close_distributed(model) -> None:
    """Under torchrun, end the DeepSpeed engine and the process group before the interpreter exits: their
    threads torn down at exit instead crashed a process now and then (SIGABRT after the final save)."""
    import torch.distributed

    from tunesmith.train import zero

    engine = zero.engine_of(model)
    if engine is not None:
        engine.destroy()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run(args: argparse.Namespace) -> int:
    if args.nproc is not None and "LOCAL_RANK" not in os.environ:
        config = load_config(args.config, args.overrides)  # a bad config is refused here, not once per process
        sys.stdout.flush()
        sys.stderr.flush()
        return launch(torchrun_command(args), config)
    config = load_config(args.config, args.overrides)
    result = recipe_for(config.task)(config, resume=args.resume, overwrite=args.overwrite)
    close_distributed(result.model)
    run_dir = result.run_dir
    use = f"tunesmith reward score {run_dir} --file ROWS" if config.task == "reward" else f"tunesmith chat {run_dir}"
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one process says it
        print(f"run folder: {run_dir}\nuse it: {use}")
    return 0
