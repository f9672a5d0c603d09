"""Kill a run with SIGKILL after a checkpoint, resume it, and get the uninterrupted run's weights."""

import json
import subprocess
import sys
import textwrap

import torch
import yaml
from safetensors.torch import load_file

from tunesmith.config.load import build_config
from tunesmith.recipes.sft import run_sft
from tunesmith.train.checkpoint import list_checkpoints
from helpers import read_metrics, tiny_tree

# Runs `tunesmith train` in a child process whose checkpoint writer kills the process (SIGKILL,
# no cleanup) in the middle of writing its third checkpoint, after two complete ones.
KILLER = textwrap.dedent("""
    import os, signal, sys
    import tunesmith.train.checkpoint as checkpoint
    real_save_file, calls = checkpoint.save_file, []
    def save_file_then_maybe_die(tensors, path, *args, **kwargs):
        calls.append(path)  # two safetensors files per checkpoint: trainable, then rng
        if len(calls) == 6:  # third checkpoint, half written
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save_file(tensors, path, *args, **kwargs)
    checkpoint.save_file = save_file_then_maybe_die
    from tunesmith.cli.main import main
    sys.exit(main(sys.argv[1:]))
""")


def test_resume_after_sigkill_equals_uninterrupted(tiny_model_dir, chat_file, tmp_path):
    tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", "lora", max_steps=12, save_every=3,
                     keep_last=2, scheduler="cosine", warmup_steps=2)
    tree["method"]["lora"]["dropout"] = 0.1  # dropout draws from the RNG: the RNG state must be restored too
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(tree))

    killed = subprocess.run([sys.executable, "-c", KILLER, "train", str(config_path)], capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_dir = tmp_path / "runs" / "tiny"
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-0000003", "step-0000006"]
    assert list((run_dir / "checkpoints").glob(".tmp-*")), "the kill should leave a half-written checkpoint"
    assert not (run_dir / "model").exists()
    steps_before = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps_before == list(range(1, 10))

    resumed = run_sft(build_config(yaml.safe_load(config_path.read_text())), resume=True)
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "the half-written checkpoint was not cleaned up"
    steps_after = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps_after == list(range(1, 13)), "metrics.jsonl must hold each step once"

    tree["output"]["dir"] = str(tmp_path / "straight")
    straight = run_sft(build_config(tree))
    resumed_weights = load_file(str(resumed.run_dir / "model" / "adapter_model.safetensors"))
    straight_weights = load_file(str(straight.run_dir / "model" / "adapter_model.safetensors"))
    assert resumed_weights.keys() == straight_weights.keys()
    for name, tensor in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=0, atol=1e-6, msg=name)
    curve = {r["step"]: r["loss"] for r in read_metrics(resumed.run_dir) if "loss" in r}
    assert curve == {r["step"]: r["loss"] for r in read_metrics(straight.run_dir) if "loss" in r}
    assert json.loads((resumed.run_dir / "summary.json").read_text())["steps"] == 12
