"""Two processes (DDP or FSDP2 on the gloo backend) train what one process trains with the same global batch, with
the fast path on; a run stopped under DDP resumes on two processes, on one, and a one-process run on two.

Tolerance: the two-process gradient is the sum of two all-reduced halves, the one-process gradient one
sum, so they differ in float order (~1e-7). Full fine-tuning stays within 1e-5. For LoRA, AdamW divides
each update by the gradient's running RMS, and a LoRA A matrix has a zero gradient at the first step
(its B is zero) and near-zero ones after it: there the float-order difference is amplified, so LoRA
weights are compared at 5e-5 (the losses at 1e-5)."""

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

from tunesmith.cli.train import recipe_for
from tunesmith.config.load import build_config
from survive import CHILD, assert_same_weights, child_env, model_weights, status, step_records, task_tree, \
    wait_for_steps, write_config

TOLERANCE = {"lora": 5e-5, "full": 1e-5}


def _tree(method, model_dir, folder, **training):
    tree = task_tree("sft", model_dir, folder, **{"max_steps": 6, "batch_size": 2, **training})
    tree["method"]["type"] = method
    tree["method"]["lora"]["dropout"] = 0.0  # each process draws its own dropout masks: not one process's
    return tree


def _one_process(method, model_dir, folder, **training):
    """The reference: one process, grad_accum 4 (the global batch of two processes x grad_accum 2)."""
    return recipe_for("sft")(build_config(_tree(method, model_dir, folder, grad_accum=4, **training))).run_dir


def _torchrun(config, folder, *extra, plan=None):
    """`tunesmith train CONFIG --nproc 2`, or the signalling child of survive.py under torchrun with ``plan``."""
    if plan is None:
        command = [sys.executable, "-m", "tunesmith", "train", str(config), "--nproc", "2", *extra]
    else:
        script = folder / "child.py"
        script.write_text(CHILD)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   str(script), "train", str(config), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env=child_env(plan or {"at": "never", "count": 0}))


def _same_run(got, expected, method):
    assert_same_weights(model_weights(got), model_weights(expected), atol=TOLERANCE[method])
    assert [r["tokens"] for r in step_records(got)] == [r["tokens"] for r in step_records(expected)], \
        "the step's tokens: every process's, summed"
    assert [r["loss"] for r in step_records(got)] == pytest.approx([r["loss"] for r in step_records(expected)],
                                                                   abs=1e-5)


@pytest.mark.parametrize("strategy, method", [("ddp", "lora"), ("ddp", "full"), ("fsdp", "lora"), ("fsdp", "full"),
                                              ("fsdp-offload", "full"), ("ddp-tokens", "lora")])
def test_two_processes_equal_one_with_the_fast_path_on(strategy, method, tiny_model_dir, tmp_path):
    """fsdp-offload: the shards in CPU memory and the optimizer stepping there (CPUOffloadPolicy; on this CPU
    machine the offload's copies are no-ops, the code path is the one a GPU takes). ddp-tokens: micro-batches
    packed by tokens (training.batch_tokens), the same packs on one process and on two."""
    offload = strategy == "fsdp-offload"
    tokens = {"batch_tokens": 100} if strategy == "ddp-tokens" else {}
    tree = _tree(method, tiny_model_dir, tmp_path / "two", grad_accum=2, distributed=strategy.split("-")[0],
                 fsdp={"cpu_offload": offload}, **tokens)
    config = write_config(tree, tmp_path / "two.yaml")
    done = _torchrun(config, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1, "one process reports"
    assert "distributed: 2 processes (MULTI_CPU, gloo backend)" in done.stderr
    assert "chunked loss (no full logits)" in done.stderr and "per-row attention" in done.stderr
    assert ("fsdp: 2 decoder layers and the model sharded" in done.stderr) == strategy.startswith("fsdp")
    assert (f"CPU offload: {offload})" in done.stderr) == strategy.startswith("fsdp")
    two = tmp_path / "two" / "runs" / "tiny"
    assert json.loads((two / "summary.json").read_text())["steps"] == 6
    _same_run(two, _one_process(method, tiny_model_dir, tmp_path / "one", **tokens), method)
    assert [r["rows"] for r in step_records(two)] == [r["rows"] for r in step_records(tmp_path / "one" / "runs" /
                                                                                     "tiny")]


def _stopped_in_step_3(method, model_dir, tmp_path, **training):
    """Two processes with grad_accum 2, both given SIGTERM in step 3 (as from a scheduler): the config tree,
    its file, and the run folder, which says preempted at step 3."""
    tree = _tree(method, model_dir, tmp_path / "run", grad_accum=2, save_every=100, **training)
    config = write_config(tree, tmp_path / "run.yaml")
    stopped = _torchrun(config, tmp_path, plan={"at": "loss", "count": 5})
    assert stopped.returncode != 0, stopped.stderr[-3000:]
    run_dir = tmp_path / "run" / "runs" / "tiny"
    assert status(run_dir)["status"] == "preempted" and status(run_dir)["step"] == 3
    return tree, config, run_dir


def _resume_on_two_and_on_one(tree, config, run_dir, method, model_dir, tmp_path):
    """Resume the stopped run on two processes, and a copy of it on this process alone: both end at the
    one-process run's weights."""
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run", copy)
    resumed = _torchrun(config, tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = _one_process(method, model_dir, tmp_path / "one")
    _same_run(run_dir, reference, method)
    assert [r["step"] for r in step_records(run_dir)] == list(range(1, 7))
    tree["output"]["dir"] = str(copy / "runs")
    recipe_for("sft")(build_config(tree), resume=True)
    _same_run(copy / "runs" / "tiny", reference, method)


def test_sigterm_under_ddp_resumes_on_two_processes_and_on_one(tiny_model_dir, tmp_path):
    """The stop's checkpoint holds each process's RNG and the process count; the run resumes on two
    processes, and a copy of it on one (grad_accum 2 -> 4)."""
    tree, config, run_dir = _stopped_in_step_3("lora", tiny_model_dir, tmp_path)
    checkpoint = run_dir / "checkpoints" / "step-0000003"
    assert (checkpoint / "rng-1.safetensors").is_file(), "process 1's RNG state"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["processes"] == 2
    _resume_on_two_and_on_one(tree, config, run_dir, "lora", tiny_model_dir, tmp_path)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_one_process_run_resumes_on_two(strategy, tiny_model_dir, tmp_path):
    """fsdp: the whole tensors of a one-process checkpoint are read by process 0 and scattered into shards."""
    tree = _tree("full", tiny_model_dir, tmp_path / "run", grad_accum=4, save_every=100)
    config = write_config(tree, tmp_path / "run.yaml")
    stopped = subprocess.run([sys.executable, "-c", CHILD, "train", str(config)], capture_output=True, text=True,
                             timeout=300, env=child_env({"at": "loss", "count": 9}))  # step 3's first micro-batch
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    resumed = _torchrun(config, tmp_path, "--resume", f"training.distributed={strategy}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "elastic resume: 1 -> 2 processes; training.grad_accum 4 -> 2" in resumed.stderr
    _same_run(tmp_path / "run" / "runs" / "tiny", _one_process("full", tiny_model_dir, tmp_path / "one"), "full")


def test_sigkill_of_one_process_under_ddp_then_resume(tiny_model_dir, tmp_path):
    """Process 0 dies (SIGKILL) while writing the step-4 checkpoint; torchrun ends the other; --resume on two
    processes goes on from step 2's and ends at the uninterrupted run's weights."""
    tree = _tree("lora", tiny_model_dir, tmp_path / "run", grad_accum=2, save_every=2)
    config = write_config(tree, tmp_path / "run.yaml")
    killer = CHILD.replace('plan = json.loads(os.environ["PLAN"])', 'plan = json.loads(os.environ["PLAN"])\n'
                           'if os.environ.get("RANK") == "0":\n'
                           '    import tunesmith.train.checkpoint as _c\n'
                           '    _real, _n = _c.save_file, []\n'
                           '    def _die(t, p, *a, **k):\n'
                           '        _n.append(p)\n'
                           '        if len(_n) == 4:\n'
                           '            os.kill(os.getpid(), signal.SIGKILL)\n'
                           '        return _real(t, p, *a, **k)\n'
                           '    _c.save_file = _die')
    script = tmp_path / "killer.py"
    script.write_text(killer)
    killed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script), "train", str(config)], capture_output=True, text=True, timeout=600,
                            env=child_env({"at": "never", "count": 0}))
    assert killed.returncode != 0
    run_dir = tmp_path / "run" / "runs" / "tiny"
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-")] == ["step-0000002"]
    resumed = _torchrun(config, tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_run(run_dir, _one_process("lora", tiny_model_dir, tmp_path / "one"), "lora")


def test_a_step_s_rows_are_dealt_over_processes_by_tokens():
    """24 rows of 1..24 tokens, batch 3, two processes x grad_accum 2: in data order the processes would get
    micro-batches of very different lengths; dealt, their tokens differ by at most one row's worth, every
    row of the step is trained once, and each process keeps its micro-batches of 3 rows."""
    from tunesmith.train.loop import MicroBatches, _balanced_window, row_tokens

    rows = [{"input_ids": list(range(n)), "n": n} for n in range(1, 25)]
    stream = MicroBatches(rows, batch_size=3, seed=0, collate=lambda batch: {"rows": batch})
    stream.per_epoch = 8
    stream._orders = {0: list(range(24))}  # data order = length order: the worst case for plain interleaving
    hands = [_balanced_window(stream, 0, 2, None, process, 2, 1) for process in (0, 1)]
    tokens = [sum(row_tokens(r) for batch in hand for r in batch["rows"]) for hand in hands]
    plain = [sum(n for p in range(process, 4, 2) for n in range(3 * p + 1, 3 * p + 4)) for process in (0, 1)]
    print(f"tokens per process: dealt {tokens}, in data order {plain}")
    assert abs(tokens[0] - tokens[1]) <= 1 < abs(plain[0] - plain[1])
    assert sorted(r["n"] for hand in hands for batch in hand for r in batch["rows"]) == list(range(1, 13))
    assert [len(batch["rows"]) for hand in hands for batch in hand] == [3, 3, 3, 3]



def test_fsdp_checkpoints_resume_sharded_and_on_one_process(tiny_model_dir, tmp_path):
    """A full fine-tune sharded over two processes is stopped in step 3; its checkpoint holds each process's
    shards (torch.distributed.checkpoint), and resumes sharded on two processes, and a copy of it unsharded
    on one (read whole, without a process group)."""
    tree, config, run_dir = _stopped_in_step_3("full", tiny_model_dir, tmp_path, distributed="fsdp")
    checkpoint = run_dir / "checkpoints" / "step-0000003"
    assert (checkpoint / "shards" / ".metadata").is_file(), "each process's shards (torch.distributed.checkpoint)"
    assert not (checkpoint / "trainable.safetensors").exists(), "no whole copy gathered on process 0"
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "the staging folder was committed"
    _resume_on_two_and_on_one(tree, config, run_dir, "full", tiny_model_dir, tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"task": "grpo", "grpo": {"rewards": ["helpers:text_length"]}}, "task grpo samples inside each step"),
    ({"method": {"type": "qlora"}}, "method qlora cannot be sharded yet"),
    ({"task": "reward"}, "task reward is not sharded yet"),
])
def test_what_fsdp_cannot_shard_yet_is_refused_before_anything_loads(change, message, tiny_model_dir, tmp_path):
    from tunesmith.errors import ConfigError

    tree = {**_tree("lora", tiny_model_dir, tmp_path, distributed="fsdp"), **change}
    with pytest.raises(ConfigError, match=message):
        build_config(tree)


def test_fsdp_evaluates_keeps_the_best_and_checkpoints_after_evals(tiny_model_dir, tmp_path):
    """Evaluation leaves the root's weights gathered (a forward without backward): the checkpoint written after
    it and keep_best's load at the end must still see the shards."""
    def tree(folder, **training):
        config = _tree("full", tiny_model_dir, folder, eval_every=2, save_every=2, keep_best=True, **training)
        config["data"]["eval_fraction"] = 0.25
        config["eval"] = {"samples": 2, "max_new_tokens": 6}  # generated by both processes together, in step
        return config

    config = write_config(tree(tmp_path / "two", grad_accum=2, distributed="fsdp"), tmp_path / "two.yaml")
    done = _torchrun(config, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    two = tmp_path / "two" / "runs" / "tiny"
    one = recipe_for("sft")(build_config(tree(tmp_path / "one", grad_accum=4))).run_dir
    _same_run(two, one, "full")
    summaries = [json.loads((run / "summary.json").read_text()) for run in (two, one)]
    assert summaries[0]["best_step"] == summaries[1]["best_step"]
    assert summaries[0]["final_eval_loss"] == pytest.approx(summaries[1]["final_eval_loss"], abs=1e-5)
    samples = [[r["samples"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "samples" in r] for run in (two, one)]
    assert len(samples[0]) == 3 and samples[0] == samples[1], "the replies of every eval, as on one process"


def test_a_reward_model_trains_under_ddp_as_on_one_process(tiny_model_dir, tmp_path):
    """The reward head scores through the DDP wrapper's forward (its gradients are all-reduced)."""
    def tree(folder, **training):
        config = task_tree("dpo", tiny_model_dir, folder, **{"max_steps": 4, "batch_size": 2, **training})
        config["task"] = "reward"
        del config["preference"]
        config["method"]["lora"]["dropout"] = 0.0
        return config

    config = write_config(tree(tmp_path / "two", grad_accum=2), tmp_path / "two.yaml")
    done = _torchrun(config, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    one = recipe_for("reward")(build_config(tree(tmp_path / "one", grad_accum=4))).run_dir
    _same_run(tmp_path / "two" / "runs" / "tiny", one, "lora")



def test_sigusr1_to_the_launcher_checkpoints_every_process(tiny_model_dir, tmp_path):
    """Slurm's --signal sends SIGUSR1 to the process it started: `tunesmith train --nproc 2` (torchrun in
    its place) passes it on, and the processes stop after the same step with one checkpoint."""
    import signal

    tree = _tree("lora", tiny_model_dir, tmp_path / "run", grad_accum=2, save_every=100, max_steps=200)
    config = write_config(tree, tmp_path / "run.yaml")
    run_dir = tmp_path / "run" / "runs" / "tiny"
    launcher = subprocess.Popen([sys.executable, "-m", "tunesmith", "train", str(config), "--nproc", "2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=child_env({"at": "never", "count": 0}))
    wait_for_steps(launcher, run_dir, 2, timeout=300)
    launcher.send_signal(signal.SIGUSR1)
    _, stderr = launcher.communicate(timeout=300)
    record = status(run_dir)
    assert record["status"] == "preempted", stderr[-3000:]
    assert launcher.returncode == 143 == record["exit_code"], "the run's own exit code, not torchrun's 1"
    assert record["reason"].startswith("SIGUSR1") and 2 <= record["step"] < 200
    assert (run_dir / "checkpoints" / f"step-{record['step']:07d}" / "rng-1.safetensors").is_file()


deepspeed_installed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                         reason="DeepSpeed is not installed (pip install 'tunesmith[deepspeed]')")


@deepspeed_installed
@pytest.mark.parametrize("stage, method", [(2, "lora"), (2, "full"), (3, "full")])
def test_deepspeed_zero_with_two_processes_equals_one(stage, method, tiny_model_dir, tmp_path):
    """DeepSpeed's CPU accelerator with gloo: ZeRO partitions the gradients and optimizer state (and at stage 3
    the weights) over the processes; the weights end where one process's do. Stage 3 runs without the fused
    LoRA and chunked loss (they read weights outside their module's forward)."""
    tree = _tree(method, tiny_model_dir, tmp_path / "two", grad_accum=2, distributed="deepspeed",
                 deepspeed={"stage": stage})
    config = write_config(tree, tmp_path / "two.yaml")
    done = _torchrun(config, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"deepspeed: ZeRO stage {stage} over 2 processes" in done.stderr
    assert ("chunked loss (no full logits)" in done.stderr) == (stage == 2)
    two = tmp_path / "two" / "runs" / "tiny"
    written = json.loads((two / "deepspeed.json").read_text())
    assert written["zero_optimization"]["stage"] == stage and written["gradient_accumulation_steps"] == 1
    _same_run(two, _one_process(method, tiny_model_dir, tmp_path / "one"), method)


@deepspeed_installed
@pytest.mark.parametrize("method", ["full", "lora"])
def test_deepspeed_checkpoints_resume_on_the_same_processes_and_refuse_others(method, tiny_model_dir, tmp_path):
    """ZeRO-2 with the optimizer offloaded to CPU memory, stopped in step 3 (SIGTERM): the checkpoint holds the
    engine's files (for LoRA without the frozen base weights), resumes on two processes to the one-process run's
    weights, and a resume on one process (whose ZeRO partitions would not match) is refused before any step."""
    from tunesmith.errors import TunesmithError

    tree, config, run_dir = _stopped_in_step_3(method, tiny_model_dir, tmp_path, distributed="deepspeed",
                                               deepspeed={"offload_optimizer": True})
    checkpoint = run_dir / "checkpoints" / "step-0000003"
    assert (checkpoint / "deepspeed" / "state").is_dir() and (checkpoint / "rng-1.safetensors").is_file()
    import torch  # the engine's own file, written by this test's run (DeepSpeed pickles it)

    saved = torch.load(checkpoint / "deepspeed" / "state" / "mp_rank_00_model_states.pt", weights_only=False)
    names = list(saved["module"])
    if method == "lora":
        assert any("lora_A" in n for n in names) and not any("base_layer" in n for n in names), \
            "a LoRA checkpoint does not copy the frozen base layers"
    else:
        assert any(n.endswith("mlp.down_proj.weight") for n in names)
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run", copy)
    resumed = _torchrun(config, tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_run(run_dir, _one_process(method, tiny_model_dir, tmp_path / "one"), method)
    tree["output"]["dir"] = str(copy / "runs")
    with pytest.raises(TunesmithError, match="holds DeepSpeed ZeRO partitions of 2 processes; this run has 1"):
        recipe_for("sft")(build_config(tree), resume=True)
    assert status(copy / "runs" / "tiny")["step"] == 3, "the refused resume trained nothing"
