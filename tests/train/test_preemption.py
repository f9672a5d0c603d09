"""SIGTERM (or SIGUSR1, or Ctrl-C) at any point of a run: the step in flight finishes (or is dropped
past the grace period), a checkpoint is written, the run says preempted and exits 143, and --resume
ends at the uninterrupted run's weights with every step logged once."""

import json
import random
import signal
import subprocess
import sys

import pytest
import yaml

from tunesmith.cli.train import recipe_for
from tunesmith.config.load import build_config
from tunesmith.train.checkpoint import list_checkpoints
from helpers import read_metrics
from survive import CHILD, assert_same_weights, child_env, model_weights, start_child, status, step_records, task_tree, \
    train_child, wait_for_steps, write_config

STEPS, ACCUM = 8, 2  # 16 loss_sum calls in training; checkpoints every 3 steps: 3 and 6, two files each

# Where the signal lands, as (what is counted, which one, extra config). The counts are drawn once with
# a fixed seed so that the trials cover the first, middle and last micro-batch of a step, a step just
# before a periodic checkpoint, the last step, and the middle of a checkpoint write.
_draw = random.Random(18)
TRIALS = [
    ("loss", 1, {}),  # the first micro-batch of the run
    ("loss", 6, {}),  # the second micro-batch of step 3, whose periodic checkpoint comes next
    ("loss", _draw.randint(7, 10), {}),
    ("loss", _draw.randint(11, 15), {}),
    ("loss", 16, {}),  # the last micro-batch of the last step
    ("save", 1, {}),  # inside the step-3 checkpoint's write, between its two files
    ("save", 3, {}),  # inside the step-6 checkpoint's write
    ("loss", 3, {"preemption_grace_s": 0}),  # past the grace period: step 2 is dropped, the checkpoint is step 1's
    ("loss", _draw.randint(9, 15) | 1, {"preemption_grace_s": 0}),  # a first micro-batch: its step is dropped
    ("loss", _draw.randint(2, 15), {"signal": "SIGUSR1"}),
]


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    """The uninterrupted run of each task, trained once for the module."""
    cache = {}

    def run(task: str):
        if task not in cache:
            folder = tmp_path_factory.mktemp(f"straight-{task}")
            tree = task_tree(task, tiny_model_dir, folder, **({} if task == "ppo" else {"grad_accum": ACCUM,
                                                                                         "save_every": 3}))
            cache[task] = recipe_for(task)(build_config(tree)).run_dir
        return cache[task]
    return run


def _check_preempted_then_resume(task, tree, config_path, done, straight_dir):
    """After a preempted child: the folder says preempted at the checkpointed step; --resume in this process
    ends where the straight run ended, each step logged once, the loss curve the same."""
    run_dir = config_path.parent / "runs" / "tiny"
    record = status(run_dir)
    assert record["status"] == "preempted" and record["step"] == done, record
    assert list_checkpoints(run_dir)[-1].name == f"step-{done:07d}"
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert [r["step"] for r in step_records(run_dir)] == list(range(1, done + 1)), "steps before the stop are kept"
    assert not (run_dir / "model").exists()

    resumed = recipe_for(task)(build_config(yaml.safe_load(config_path.read_text())), resume=True)
    assert status(run_dir)["status"] == "finished"
    records = step_records(resumed.run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), "a step lost or repeated"
    expected = step_records(straight_dir)
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in expected], abs=1e-6)
    assert_same_weights(model_weights(resumed.run_dir), model_weights(straight_dir))


@pytest.mark.parametrize("at,count,extra", TRIALS, ids=[f"{a}{c}{'-' + '-'.join(e) if e else ''}"
                                                        for a, c, e in TRIALS])
def test_sigterm_anywhere_then_resume_equals_the_uninterrupted_run(at, count, extra, straight, tiny_model_dir,
                                                                    tmp_path):
    training = {k: v for k, v in extra.items() if k != "signal"}
    tree = task_tree("sft", tiny_model_dir, tmp_path, grad_accum=ACCUM, save_every=3, **training)
    config_path = write_config(tree, tmp_path / "run.yaml")
    child = train_child(config_path, {"at": at, "count": count, **{k: v for k, v in extra.items() if k == "signal"}})
    assert child.returncode == 143, child.stderr[-3000:]
    assert "Traceback" not in child.stderr
    assert "stopped: " in child.stderr and "--resume" in child.stderr
    if at == "loss":  # the step of the signalled micro-batch finishes, unless the grace period is 0
        step = (count - 1) // ACCUM + 1
        dropped = extra.get("preemption_grace_s") == 0 and (count - 1) % ACCUM < ACCUM - 1
        done = step - 1 if dropped else step
        if dropped:
            assert "given up" in child.stderr
    else:
        done = 3 * ((count + 1) // 2)  # the checkpoint being written when the signal came
        assert f"step-{done:07d}" in child.stderr
    _check_preempted_then_resume("sft", tree, config_path, done, straight("sft"))


@pytest.mark.parametrize("task", ["dpo", "grpo"])
def test_dpo_and_grpo_runs_are_preempted_and_resume_exactly(task, straight, tiny_model_dir, tmp_path):
    tree = task_tree(task, tiny_model_dir, tmp_path, grad_accum=ACCUM, save_every=3)
    config_path = write_config(tree, tmp_path / "run.yaml")
    child = train_child(config_path, {"at": "loss", "count": 9})  # step 5's first micro-batch
    assert child.returncode == 143, child.stderr[-3000:]
    _check_preempted_then_resume(task, tree, config_path, 5, straight(task))


def test_ppo_stops_at_the_end_of_its_batch_of_rollouts(straight, tiny_model_dir, tmp_path):
    """A checkpoint inside a batch of rollouts could not resume (the rollouts are sampled at its first step):
    a SIGTERM in step 2 finishes steps 2-4, without sampling, and checkpoints at step 4."""
    tree = task_tree("ppo", tiny_model_dir, tmp_path)
    config_path = write_config(tree, tmp_path / "run.yaml")
    child = train_child(config_path, {"at": "loss", "count": 2})
    assert child.returncode == 143, child.stderr[-3000:]
    _check_preempted_then_resume("ppo", tree, config_path, 4, straight("ppo"))


def test_a_signal_from_outside_marks_the_mlflow_run_killed(tiny_model_dir, tmp_path, capsys):
    """A real SIGTERM from another process while the run trains (each micro-batch slowed to 0.2 s)."""
    import mlflow

    tree = task_tree("sft", tiny_model_dir, tmp_path, grad_accum=ACCUM, save_every=3)
    tree["tracking"] = {"backends": ["mlflow"]}
    config_path = write_config(tree, tmp_path / "run.yaml")
    run_dir = tmp_path / "runs" / "tiny"
    child = start_child(config_path, {"at": "never", "count": 0, "sleep": 0.2})
    wait_for_steps(child, run_dir, 2, timeout=240)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 143, stderr[-3000:]
    done = status(run_dir)["step"]
    assert 2 <= done < STEPS
    ids = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    run = mlflow.MlflowClient(ids["uri"]).get_run(ids["run_id"])
    assert run.info.status == "KILLED" and run.data.tags["tunesmith.status"] == "preempted"

    from tunesmith.cli.main import main
    assert main(["runs", "list", "--dir", str(tmp_path / "runs")]) == 0
    assert f"preempted (step {done})" in capsys.readouterr().out


def test_a_second_signal_stops_at_once_without_a_checkpoint(tiny_model_dir, tmp_path):
    tree = task_tree("sft", tiny_model_dir, tmp_path, grad_accum=ACCUM, save_every=3)
    config_path = write_config(tree, tmp_path / "run.yaml")
    # SIGTERM in step 5; another as the stop's checkpoint (step 5) starts to be written.
    child = train_child(config_path, {"at": "loss", "count": 9, "second": True})
    assert child.returncode == 143, child.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-0000003"], "the stop's checkpoint was not skipped"
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "the half-written checkpoint was left"
    record = status(run_dir)
    assert record["status"] == "preempted" and "second stop signal" in record["reason"]


def test_save_every_minutes_writes_checkpoints_by_the_clock(tiny_model_dir, tmp_path):
    tree = task_tree("sft", tiny_model_dir, tmp_path, max_steps=4, save_every=None, save_every_minutes=1e-9,
                     keep_last=10)
    run = recipe_for("sft")(build_config(tree))
    assert [p.name for p in list_checkpoints(run.run_dir)] == [f"step-{s:07d}" for s in (1, 2, 3)]
    tree = task_tree("sft", tiny_model_dir, tmp_path / "hourly", max_steps=4, save_every=None,
                     save_every_minutes=60, keep_last=10)
    assert list_checkpoints(recipe_for("sft")(build_config(tree)).run_dir) == []


def test_a_stop_at_an_eval_step_evaluates_first_after_resume(tiny_model_dir, tmp_path):
    """SIGTERM in step 4 (eval_every 2): the step finishes and is checkpointed without its eval, which is the
    first thing --resume does; the eval losses are the uninterrupted run's."""
    tree = task_tree("sft", tiny_model_dir, tmp_path, grad_accum=ACCUM, save_every=3, eval_every=2)
    tree["data"]["eval_fraction"] = 0.25
    config_path = write_config(tree, tmp_path / "run.yaml")
    child = train_child(config_path, {"at": "loss", "count": 7})
    assert child.returncode == 143, child.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    assert [r["step"] for r in read_metrics(run_dir) if "eval_loss" in r] == [2]
    recipe_for("sft")(build_config(yaml.safe_load(config_path.read_text())), resume=True)
    tree["output"]["dir"] = str(tmp_path / "straight")
    straight = recipe_for("sft")(build_config(tree)).run_dir
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(run_dir) if "eval_loss" in r}
    assert list(evals) == [2, 4, 6, 8]
    assert evals == pytest.approx({r["step"]: r["eval_loss"] for r in read_metrics(straight) if "eval_loss" in r},
                                  abs=1e-6)


def test_a_signal_during_the_final_save_lets_it_finish(tiny_model_dir, tmp_path):
    tree = task_tree("sft", tiny_model_dir, tmp_path, max_steps=3)
    config_path = write_config(tree, tmp_path / "run.yaml")
    child = train_child(config_path, {"at": "final", "count": 1})
    assert child.returncode == 0, child.stderr[-3000:]
    assert "SIGTERM received" in child.stderr
    run_dir = tmp_path / "runs" / "tiny"
    assert status(run_dir)["status"] == "finished" and (run_dir / "model" / "adapter_model.safetensors").is_file()


def test_the_same_signal_twice_at_once_is_one_stop(tiny_model_dir, tmp_path):
    """torchrun passes SIGTERM on to its workers, and a scheduler signalling the process group reaches them
    too: two signals within half a second are one stop, with its checkpoint."""
    tree = task_tree("sft", tiny_model_dir, tmp_path, grad_accum=ACCUM, save_every=100)
    config_path = write_config(tree, tmp_path / "run.yaml")
    once = 'os.kill(os.getpid(), getattr(signal, plan.get("signal", "SIGTERM")))'
    assert once in CHILD
    twice = CHILD.replace(once, "os.kill(os.getpid(), signal.SIGTERM); os.kill(os.getpid(), signal.SIGTERM)")
    child = subprocess.run([sys.executable, "-c", twice, "train", str(config_path)], capture_output=True, text=True,
                           timeout=300, env=child_env({"at": "loss", "count": 5}))
    assert child.returncode == 143, child.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    assert status(run_dir)["step"] == 3 and [p.name for p in list_checkpoints(run_dir)] == ["step-0000003"]
