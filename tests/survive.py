"""Shared by the tests of runs that survive: tiny configs of three tasks, a child `tunesmith train`
that signals itself at a planned point, and comparisons of run folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from helpers import counting_pairs, counting_rows, tiny_tree, write_jsonl

TESTS = Path(__file__).resolve().parent


def task_tree(task: str, model_dir: Path, folder: Path, **training) -> dict:
    """A tiny LoRA run of ``task`` (sft, dpo, grpo or ppo) on data written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if task == "dpo":
        data = write_jsonl(folder / "pairs.jsonl", counting_pairs())
    else:
        data = write_jsonl(folder / "train.jsonl", counting_rows())
    tree = tiny_tree(model_dir, data, folder / "runs", "lora", **{"max_steps": 8, "batch_size": 2, **training})
    tree["method"]["lora"]["dropout"] = 0.1  # dropout draws on the RNG: a resume must restore it
    if task == "dpo":
        tree["task"] = "dpo"
        tree["preference"] = {"loss": "dpo", "beta": 0.5}
    elif task == "ppo":  # 2 PPO epochs x 2 minibatches: a batch of rollouts is 4 steps
        tree["task"] = "ppo"
        tree["training"].update(batch_size=4, save_every=4)
        tree["ppo"] = {"rewards": ["helpers:text_length"], "max_new_tokens": 6, "ppo_epochs": 2, "minibatches": 2}
    elif task == "grpo":
        tree["task"] = "grpo"
        # Longer replies score higher: the rewards differ within a group, so the policy moves from step 1.
        tree["grpo"] = {"rewards": ["helpers:text_length"], "group_size": 3, "max_new_tokens": 4, "beta": 0.04}
    return tree


def write_config(tree: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


# A child `tunesmith train CONFIG` that counts the objective's loss_sum calls of training steps and the
# checkpoint writer's save_file calls (two per checkpoint: the weights, then the RNG), and at the planned
# one sends itself a signal; "second" sends another at the next checkpoint write; "sleep" slows each step.
CHILD = textwrap.dedent("""
    import json, os, signal, sys, time
    plan = json.loads(os.environ["PLAN"])
    import tunesmith.train.checkpoint as checkpoint
    import tunesmith.train.loop as loop
    calls = {"loss": 0, "save": 0, "final": 0}
    fired = []

    def tick(kind):
        calls[kind] += 1
        if not fired and kind == plan["at"] and calls[kind] == plan["count"]:
            fired.append(calls["save"])
            os.kill(os.getpid(), getattr(signal, plan.get("signal", "SIGTERM")))
        elif fired and plan.get("second") and kind == "save" and calls["save"] > fired[0]:
            time.sleep(0.6)  # signals closer than half a second count as one (a launcher passing one on)
            os.kill(os.getpid(), signal.SIGTERM)

    class Counted:
        def __init__(self, objective):
            self.objective = objective
        def __getattr__(self, name):
            return getattr(self.objective, name)
        def loss_sum(self, model, batch):
            time.sleep(plan.get("sleep", 0))
            tick("loss")
            return self.objective.loss_sum(model, batch)

    real_step, real_save = loop._train_step, checkpoint.save_file
    loop._train_step = lambda model, objective, *a, **k: real_step(model, Counted(objective), *a, **k)

    def fill():  # another program fills the disk
        with open(plan["fill"], "wb") as filler:
            try:
                while True:
                    filler.write(bytes(1 << 16))
                    filler.flush()
            except OSError:  # the disk is full: what the test wants
                pass

    def save_file(tensors, path, *a, **k):
        tick("save")
        if calls["save"] == plan.get("fill_at"):  # before this file: a checkpoint's weights
            fill()
        written = real_save(tensors, path, *a, **k)
        if calls["save"] == plan.get("fill_after"):  # after it: torch.save's optimizer.pt comes next
            fill()
        return written
    checkpoint.save_file = save_file

    import tunesmith.recipes.base as base
    real_final = base.save_final_model

    def save_final_model(*a, **k):
        tick("final")
        return real_final(*a, **k)
    base.save_final_model = save_final_model
    from tunesmith.cli.main import main
    sys.exit(main(sys.argv[1:]))
""")


def child_env(plan: dict) -> dict:
    return {**os.environ, "PLAN": json.dumps(plan), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def train_child(config: Path, plan: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, "train", str(config)], capture_output=True, text=True,
                          timeout=timeout, env=child_env(plan))


def start_child(config: Path, plan: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, "train", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(plan))


def model_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The final model's weights: an adapter's, or a full model's."""
    adapter = run_dir / "model" / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.is_file() else run_dir / "model" / "model.safetensors"))


def checkpoint_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """A checkpoint's trainable weights named as the adapter file names them (no ``.default``)."""
    weights = load_file(str(run_dir / "checkpoints" / f"step-{step:07d}" / "trainable.safetensors"))
    return {name.replace(".default", ""): tensor for name, tensor in weights.items()}


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=atol, msg=name)


def step_records(run_dir: Path) -> list[dict]:
    from helpers import read_metrics

    return [r for r in read_metrics(run_dir) if "loss" in r]


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def plant(monkeypatch, change) -> None:
    """Every training micro-batch's loss goes through ``change(call, loss)`` (calls count from 1; the
    eval passes are not counted)."""
    import tunesmith.train.loop as loop

    real, calls = loop._train_step, [0]

    class Planted:
        def __init__(self, objective):
            self.objective = objective

        def __getattr__(self, name):
            return getattr(self.objective, name)

        def loss_sum(self, model, batch):
            calls[0] += 1
            return change(calls[0], self.objective.loss_sum(model, batch))

    monkeypatch.setattr(loop, "_train_step", lambda model, objective, *a, **k: real(model, Planted(objective), *a, **k))


def gradient_times(factor: float):
    """A loss whose value is unchanged and whose gradient is ``factor`` times larger (a corrupt batch)."""
    return lambda loss: loss + (factor - 1) * (loss - loss.detach())


def wait_for_steps(process: subprocess.Popen, run_dir: Path, steps: int, timeout: float) -> None:
    """Wait until ``run_dir``'s metrics.jsonl logs ``steps`` steps (or the process ends, or time runs out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None and not (
            (run_dir / "metrics.jsonl").exists() and len(step_records(run_dir)) >= steps):
        time.sleep(0.05)
