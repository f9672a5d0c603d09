"""Loop features: eval cadence, early stopping, gradient checkpointing, schedule."""

import json

import pytest

import torch

from tunesmith.config.load import build_config
from tunesmith.config.schema import TrainingConfig
from tunesmith.recipes.sft import run_sft
from tunesmith.train.checkpoint import TrainState
from tunesmith.train.loop import _early_stop
from tunesmith.train.optim import build_scheduler
from helpers import read_metrics, tiny_tree


def test_eval_every_n_steps_and_at_the_end(tiny_model_dir, chat_file, tmp_path):
    tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", "lora", max_steps=7, eval_every=3)
    tree["data"]["eval_fraction"] = 0.2
    run = run_sft(build_config(tree))
    evals = [r for r in read_metrics(run.run_dir) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6, 7]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert run.result.final_eval_loss == evals[-1]["eval_loss"]


def test_early_stopping_counts_evals_without_improvement():
    state = TrainState()
    decisions = [_early_stop(state, loss, patience=2) for loss in (3.0, 2.0, 2.5, 1.9, 2.0, 2.1)]
    assert decisions == [False, False, False, False, False, True]
    assert state.best_eval_loss == 1.9


def test_early_stopping_ends_a_diverging_run(tiny_model_dir, chat_file, tmp_path):
    tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", "full", max_steps=30, eval_every=1,
                     early_stopping_patience=2, optimizer="sgd", lr=1.0, max_grad_norm=None)
    tree["data"]["eval_fraction"] = 0.2
    run = run_sft(build_config(tree))
    evals = [r["eval_loss"] for r in read_metrics(run.run_dir) if "eval_loss" in r]
    assert run.result.stopped_early and run.result.state.global_step < 30
    assert min(evals) < evals[-1] and min(evals) < evals[-2]


def test_gradient_checkpointing_recomputes_the_layers_and_gives_the_same_weights(tiny_model_dir, chat_file, tmp_path,
                                                                               monkeypatch):
    """Checkpointing is really on: backward runs each decoder layer again, so the MLP inside it
    runs once more per layer per micro-batch (2 layers x 2 steps = 4 more calls than without), and
    the weights come out the same. Catches the setting being lost on the way to the model, which
    equal weights alone do not: seen failing with apply_method's gradient_checkpointing_enable call
    taken out (the same number of MLP calls either way). The count is taken inside the layer, not
    by wrapping the layer's own forward, which transformers checkpoints (a wrapper there switches
    checkpointing off)."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    forward = LlamaMLP.forward
    calls = {"count": 0}

    def counting_forward(self, *args, **kwargs):
        calls["count"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaMLP, "forward", counting_forward)
    weights, layer_calls = [], []
    for checkpointing in (False, True):
        calls["count"] = 0
        tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / f"runs-{checkpointing}", "full", max_steps=2,
                         optimizer="sgd", lr=0.5, gradient_checkpointing=checkpointing)
        weights.append(run_sft(build_config(tree)).model.state_dict())
        layer_calls.append(calls["count"])
    assert layer_calls[1] - layer_calls[0] == 2 * 2, layer_calls  # each layer again in each backward
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=1e-6, msg=name)


def test_warmup_then_cosine_decay_to_zero():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = build_scheduler(optimizer, TrainingConfig(warmup_steps=2, scheduler="cosine"), total_steps=10)
    rates = []
    for _ in range(10):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[0] < rates[1] < rates[2] == 1.0
    assert all(a >= b for a, b in zip(rates[2:], rates[3:])) and rates[-1] < 0.05


def test_one_epoch_ends_with_the_data_instead_of_wrapping(tiny_model_dir, chat_file, tmp_path):
    # 24 rows, batch 4: 6 micro-batches; accumulation 4 -> 2 steps, the second of 2 micro-batches.
    tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", "lora", max_steps=None, epochs=1.0,
                     grad_accum=4)
    run = run_sft(build_config(tree))
    assert run.result.state.global_step == 2 and run.result.state.micro_batches_done == 6
    records = [r for r in read_metrics(run.run_dir) if "loss" in r]
    rows = [json.loads(line) for line in chat_file.read_text().splitlines()]
    assert len(records) == 2 and sum(r["tokens"] for r in records) == run.result.state.tokens_seen
    assert records[1]["epoch"] == 1.0 and len(rows) == 24


def test_fused_adamw_matches_adamw_and_8bit_adamw_learns(tiny_model_dir, chat_file, tmp_path):
    results = {}
    for optimizer in ("adamw", "adamw_fused", "adamw_8bit"):
        tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / optimizer, "full", max_steps=8, lr=3e-3,
                         optimizer=optimizer)
        run = run_sft(build_config(tree))
        results[optimizer] = (run.model.state_dict(), [r["loss"] for r in read_metrics(run.run_dir) if "loss" in r])
    for name, tensor in results["adamw"][0].items():
        torch.testing.assert_close(results["adamw_fused"][0][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    curve = results["adamw_8bit"][1]
    assert curve[-1] < 0.8 * curve[0]


def test_8bit_adamw_state_resumes_exactly(tiny_model_dir, chat_file, tmp_path):
    tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", "full", max_steps=4, save_every=2, lr=3e-3,
                     optimizer="adamw_8bit")
    config = build_config(tree)
    first = {k: v.clone() for k, v in run_sft(config).model.state_dict().items()}
    resumed = run_sft(config, resume=True).model.state_dict()  # from step 2, through the saved 8-bit state
    for name, tensor in first.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_mfu_is_logged_where_the_peak_is_known(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    """MFU = tokens/s x (4N + 2T + 6·L·s·d) / peak, s the step's mean row length; CPUs have no
    peak in the table, so the device's peak is stood in for."""
    import tunesmith.train.mfu as mfu

    monkeypatch.setattr(mfu, "peak_flops", lambda device: 1e9)
    tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", "lora", max_steps=2, batch_size=3)
    run = run_sft(build_config(tree))
    records = [r for r in read_metrics(run.run_dir) if "loss" in r]
    total = sum(p.numel() for p in run.model.parameters())
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    for record in records:
        seq = record["tokens"] / 3  # three rows per step
        per_token = 4 * total + 2 * trainable + 6 * 2 * seq * 64  # 2 layers of width 64
        assert record["mfu"] == pytest.approx(record["tokens_per_s"] * per_token / 1e9, rel=1e-3)


def test_offloaded_activations_give_the_same_step(tiny_model_dir, tokenizer):
    """Tensors saved for backward go through CPU memory and come back: the same loss and gradients."""
    from accelerate import Accelerator

    from tunesmith.adapters.apply import apply_method
    from tunesmith.config.schema import MethodConfig, ModelConfig
    from tunesmith.data.pack import collate_padding_free
    from tunesmith.data.tokenize import tokenize_messages
    from tunesmith.models.load import load_model
    from tunesmith.recipes.sft import SFTObjective
    from tunesmith.train.loop import _train_step
    from helpers import counting_rows

    batch = collate_padding_free([{"input_ids": t.input_ids, "labels": t.labels} for t in
                                  (tokenize_messages(tokenizer, r["messages"], 64) for r in counting_rows(4))])
    results = []
    for offload in (False, True):
        model = apply_method(load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu")),
                             MethodConfig(type="full"))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = _train_step(model, SFTObjective(chunked=True), [batch], Accelerator(cpu=True), optimizer, None,
                           offload=offload).loss
        results.append((loss, {n: p.detach().clone() for n, p in model.named_parameters()}))
    assert results[0][0] == results[1][0]
    for name, weight in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], weight, rtol=0, atol=0, msg=name)
