"""Non-finite steps, divergence, out-of-memory, keep_best and run status: each planted in a tiny run."""

import json
import os
import socket

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.cli.train import recipe_for
from tunesmith.config.load import build_config
from tunesmith.errors import RunStopped, TunesmithError
from tunesmith.train.checkpoint import list_checkpoints
from helpers import read_metrics
from survive import assert_same_weights, checkpoint_weights, gradient_times, model_weights, plant, status, \
    step_records, task_tree


def _optimizer_state(run_dir, step):
    state = torch.load(run_dir / "checkpoints" / f"step-{step:07d}" / "optimizer.pt", weights_only=True)["state"]
    return {(index, key): value for index, entry in state.items() for key, value in entry.items()
            if isinstance(value, torch.Tensor)}


@pytest.mark.parametrize("task", ["sft", "dpo", "grpo"])
def test_a_nonfinite_step_changes_neither_weights_nor_optimizer(task, tiny_model_dir, tmp_path, monkeypatch):
    plant(monkeypatch, lambda call, loss: loss * float("nan") if call == 3 else loss)
    tree = task_tree(task, tiny_model_dir, tmp_path, max_steps=5, save_every=1, keep_last=10)
    run = recipe_for(task)(build_config(tree))
    assert_same_weights(checkpoint_weights(run.run_dir, 3), checkpoint_weights(run.run_dir, 2), atol=0)
    before, after = _optimizer_state(run.run_dir, 2), _optimizer_state(run.run_dir, 3)
    assert before.keys() == after.keys() and before
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)
    changed = checkpoint_weights(run.run_dir, 4)
    assert any(not torch.equal(changed[k], v) for k, v in checkpoint_weights(run.run_dir, 3).items()), \
        "the step after the skipped one trains"
    records = {r["step"]: r for r in step_records(run.run_dir)}
    assert records[3]["skipped"] == "the loss is nan" and records[3]["skipped_steps"] == 1
    assert "skipped" not in records[2] and "skipped" not in records[4]
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["skipped_steps"] == 1
    assert summary["events"][0] == {"step": 3, "event": "skipped", "why": "the loss is nan"}


@pytest.mark.parametrize("task", ["sft", "dpo", "grpo"])
def test_nonfinite_steps_in_a_row_stop_the_run_with_the_last_good_weights(task, tiny_model_dir, tmp_path,
                                                                          monkeypatch):
    import mlflow

    plant(monkeypatch, lambda call, loss: loss * float("inf") if call in (4, 5, 6) else loss)
    tree = task_tree(task, tiny_model_dir, tmp_path, max_steps=10, save_every=3)
    if task == "sft":
        tree["tracking"] = {"backends": ["mlflow"]}
    with pytest.raises(RunStopped, match=r"3 non-finite steps in a row \(steps 4-6") as stopped:
        recipe_for(task)(build_config(tree))
    assert stopped.value.status == "diverged" and stopped.value.exit_code == 1
    run_dir = tmp_path / "runs" / "tiny"
    assert_same_weights(model_weights(run_dir), checkpoint_weights(run_dir, 3), atol=0)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["stopped_at_step"], summary["skipped_steps"]) == ("diverged", 6, 3)
    assert status(run_dir)["status"] == "diverged" and "step 3's" in status(run_dir)["reason"]
    assert [r["step"] for r in step_records(run_dir)] == [1, 2, 3, 4, 5, 6]
    if task == "sft":
        ids = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
        tracked = mlflow.MlflowClient(ids["uri"]).get_run(ids["run_id"])
        assert tracked.info.status == "FAILED" and tracked.data.tags["tunesmith.status"] == "diverged"
        from tunesmith import registry

        with pytest.raises(TunesmithError, match=r"is diverged \(step 6\): only a finished run can be registered"):
            registry.add(run_dir, "tiny")


def _full_sgd_tree(tiny_model_dir, tmp_path, **divergence):
    tree = task_tree("sft", tiny_model_dir, tmp_path, max_steps=14, optimizer="sgd", lr=0.05, max_grad_norm=None,
                     save_every=2, keep_last=10)
    tree["method"]["type"] = "full"
    tree["training"]["divergence"] = divergence
    return tree


def test_a_gradient_spike_rolls_back_to_a_good_checkpoint_with_a_lower_learning_rate(tiny_model_dir, tmp_path,
                                                                                     monkeypatch):
    """A corrupt batch at step 8 (its gradient x100): its gradient norm is ~50x the median, so the update is
    not applied and the run goes back to step 6's checkpoint (step 7's weights computed that gradient),
    at half the learning rate, and trains on to the end."""
    plant(monkeypatch, lambda call, loss: gradient_times(100)(loss) if call == 8 else loss)
    run = recipe_for("sft")(build_config(_full_sgd_tree(tiny_model_dir, tmp_path)))
    records = read_metrics(run.run_dir)
    rollback = [r for r in records if r.get("event") == "rollback"]
    assert len(rollback) == 1 and rollback[0]["step"] == 6 and rollback[0]["from_step"] == 8
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 15)), "each step once: the rolled-back ones replaced"
    lrs = {r["step"]: r["lr"] for r in steps}
    assert lrs[6] == pytest.approx(0.05) and lrs[7] == pytest.approx(0.025) and lrs[14] == pytest.approx(0.025)
    assert max(r["loss"] for r in steps[6:]) < steps[0]["loss"], "the run went on healthily"
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert (summary["status"], summary["rollbacks"], summary["lr_factor"]) == ("finished", 1, 0.5)
    assert [p.name for p in list_checkpoints(run.run_dir)][-1] == "step-0000012"


def test_a_loss_spike_with_policy_stop_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    """The same corrupt batch x1000 with the gradient rule off: the update lands, step 9's loss is many times
    the median, and the run stops; its model is step 6's checkpoint, not the diverged weights."""
    import tunesmith.train.loop as loop

    plant(monkeypatch, lambda call, loss: gradient_times(1000)(loss) if call == 8 else loss)
    diverged = {}
    real = loop._Training._diverged

    def seen(self, why, result):  # the weights the run had when it saw the divergence
        diverged.update({n: p.detach().clone() for n, p in self.unwrapped.named_parameters()})
        return real(self, why, result)

    monkeypatch.setattr(loop._Training, "_diverged", seen)
    tree = _full_sgd_tree(tiny_model_dir, tmp_path, policy="stop", grad_norm_ratio=None)
    with pytest.raises(RunStopped, match="diverged at step 9: the loss .* is .*x the median") as stopped:
        recipe_for("sft")(build_config(tree))
    assert stopped.value.status == "diverged"
    run_dir = tmp_path / "runs" / "tiny"
    saved = load_file(str(run_dir / "model" / "model.safetensors"))
    good = checkpoint_weights(run_dir, 6)
    assert set(good) <= set(saved)
    assert_same_weights({k: saved[k] for k in good}, good, atol=0)
    assert any(not torch.equal(diverged[k], v) for k, v in good.items()), "the diverged weights were saved"
    assert [p.name for p in list_checkpoints(run_dir)][-1] == "step-0000006", "suspect checkpoints were kept"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["stopped_at_step"] == 9
    assert "checkpoint step-0000006" in summary["reason"]


def test_policy_warn_trains_on_and_says_so(tiny_model_dir, tmp_path, monkeypatch):
    plant(monkeypatch, lambda call, loss: gradient_times(100)(loss) if call == 8 else loss)
    run = recipe_for("sft")(build_config(_full_sgd_tree(tiny_model_dir, tmp_path, policy="warn")))
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rollbacks"] == 0
    assert [e["step"] for e in summary["events"] if e["event"] == "diverging"] == [8]


def test_out_of_memory_halves_the_micro_batch_and_equals_the_smaller_batch_run(tiny_model_dir, tmp_path,
                                                                               monkeypatch):
    """A micro-batch of more than 2 rows raises CUDA's out-of-memory error: batch 4 runs as 2 x 2 rows, and
    ends at the weights of a run with batch_size 2 and grad_accum 2 from the start."""
    from tunesmith.data.collate import count_rows
    import tunesmith.train.loop as loop

    real = loop._train_step

    def step(model, objective, window, *args, **kwargs):
        if max(count_rows(b) for b in window) > 2:
            objective.loss_sum(model, window[0])  # some work is done before memory runs out
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(model, objective, window, *args, **kwargs)

    monkeypatch.setattr(loop, "_train_step", step)
    retried = recipe_for("sft")(build_config(task_tree("sft", tiny_model_dir, tmp_path / "a", batch_size=4)))
    monkeypatch.setattr(loop, "_train_step", real)
    smaller = recipe_for("sft")(build_config(task_tree("sft", tiny_model_dir, tmp_path / "b", batch_size=2,
                                                        grad_accum=2)))
    assert_same_weights(model_weights(retried.run_dir), model_weights(smaller.run_dir))
    assert [r["loss"] for r in step_records(retried.run_dir)] == pytest.approx(
        [r["loss"] for r in step_records(smaller.run_dir)], abs=1e-6)
    summary = json.loads((retried.run_dir / "summary.json").read_text())
    assert summary["micro_batch_rows"] == 2
    assert summary["events"] == [{"step": 1, "event": "out_of_memory", "micro_batch_rows": 2}]


def test_out_of_memory_with_one_row_names_the_settings_to_change(tiny_model_dir, tmp_path, monkeypatch):
    import tunesmith.train.loop as loop

    def step(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(loop, "_train_step", step)
    with pytest.raises(TunesmithError, match="out of memory at step 1 with one row per micro-batch .*"
                                             "training.batch_size 4 run in 4 pieces.*gradient_checkpointing"):
        recipe_for("sft")(build_config(task_tree("sft", tiny_model_dir, tmp_path, batch_size=4)))
    assert status(tmp_path / "runs" / "tiny")["status"] == "failed"


@pytest.mark.parametrize("patience", [None, 2])
def test_keep_best_makes_the_best_eval_step_the_model(patience, tiny_model_dir, tmp_path, monkeypatch):
    import tunesmith.train.loop as loop

    losses = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    monkeypatch.setattr(loop, "evaluate", lambda *args: next(losses))
    tree = task_tree("sft", tiny_model_dir, tmp_path, max_steps=12, eval_every=2, save_every=2, keep_last=10,
                     keep_best=True, early_stopping_patience=patience)
    tree["data"]["eval_fraction"] = 0.25
    run = recipe_for("sft")(build_config(tree))
    assert_same_weights(model_weights(run.run_dir), checkpoint_weights(run.run_dir, 4), atol=0)
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert (summary["best_step"], summary["final_eval_loss"]) == (4, 2.0)
    assert summary["steps"] == (8 if patience else 12) and summary["stopped_early"] == bool(patience)


def test_keep_best_needs_eval_data(tiny_model_dir, tmp_path):
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError, match="training.keep_best needs eval data"):
        build_config(task_tree("sft", tiny_model_dir, tmp_path, keep_best=True))


def test_runs_list_shows_each_status(tiny_model_dir, tmp_path, capsys):
    import shutil

    from tunesmith.cli.main import main

    finished = recipe_for("sft")(build_config(task_tree("sft", tiny_model_dir, tmp_path, max_steps=2))).run_dir
    records = {"preempted": {"status": "preempted", "step": 5, "reason": "SIGTERM: checkpoint ..."},
               "failed": {"status": "failed", "reason": "RuntimeError: boom"},
               "diverged": {"status": "diverged", "step": 9, "reason": "diverged at step 9"},
               "running": {"status": "running", "pid": os.getpid(), "host": socket.gethostname()},
               "killed": {"status": "running", "step": 3, "pid": 2**22 + 12345, "host": socket.gethostname()}}
    for name, record in records.items():
        folder = finished.parent / name
        shutil.copytree(finished, folder)
        (folder / "status.json").write_text(json.dumps(record))
    assert main(["runs", "list", "--dir", str(finished.parent)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "finished" in lines["tiny"]
    assert "preempted (step 5)" in lines["preempted"]
    assert "failed" in lines["failed"] and "diverged (step 9)" in lines["diverged"]
    assert "running" in lines["running"]
    assert "failed (step 3)" in lines["killed"], "a run whose process is gone is not running"
    assert main(["runs", "show", str(finished.parent / "killed")]) == 0
    assert "ended without a word" in capsys.readouterr().out


def test_a_rollback_past_the_best_eval_forgets_those_weights(tiny_model_dir, tmp_path, monkeypatch):
    """keep_best with eval_every 1: step 7's eval is the best (1.0), and step 8's gradient spike makes step 7's
    weights suspect. The rollback to step 6 drops them; the model is the best of what was trained after it."""
    import tunesmith.train.loop as loop

    losses = iter([5.0] * 6 + [1.0] + [6.0] + [7.0] * 7)
    monkeypatch.setattr(loop, "evaluate", lambda *args: next(losses))
    plant(monkeypatch, lambda call, loss: gradient_times(100)(loss) if call == 8 else loss)
    tree = _full_sgd_tree(tiny_model_dir, tmp_path)
    tree["training"].update(eval_every=1, keep_best=True)
    tree["data"]["eval_fraction"] = 0.25
    run = recipe_for("sft")(build_config(tree))
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["rollbacks"] == 1
    assert (summary["best_step"], summary["final_eval_loss"]) == (7, 6.0), "the suspect step-7 weights were kept"
