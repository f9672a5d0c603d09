"""training.batch_tokens: whole rows packed into micro-batches by tokens. No row is lost or repeated in an
epoch, the packing is deterministic, epochs and the schedule count micro-batches as with rows, a stopped run
resumes exactly, and the log and metrics say how many rows and tokens each step held."""

import dataclasses
import math
import random
import re

import pytest
import yaml

from tunesmith import estimate as est
from tunesmith.cli.train import recipe_for
from tunesmith.config.load import build_config
from tunesmith.errors import ConfigError
from tunesmith.train.loop import MicroBatches, PACKING_WINDOW, epoch_order, pack_by_tokens, row_tokens
from survive import assert_same_weights, model_weights, status, step_records, task_tree, train_child, write_config


def _lengths(count: int, seed: int = 0) -> list[int]:
    draw = random.Random(seed)  # Alpaca-like: mostly short rows, a few long ones
    return [draw.choice([draw.randint(20, 200)] * 9 + [draw.randint(300, 3000)]) for _ in range(count)]


def test_packing_keeps_every_row_once_within_the_budget_and_fills_it():
    lengths = _lengths(5000)
    order = epoch_order(len(lengths), seed=3, epoch=-1)
    packs = pack_by_tokens(lengths, 4096, order)
    assert sorted(i for pack in packs for i in pack) == list(range(len(lengths))), "a row lost or repeated"
    assert all(sum(lengths[i] for i in pack) <= 4096 or len(pack) == 1 for pack in packs)
    assert pack_by_tokens(lengths, 4096, order) == packs, "deterministic"
    fill = sum(lengths) / (len(packs) * 4096)
    print(f"\n{len(lengths)} rows of mean {sum(lengths) / len(lengths):.0f} tokens into {len(packs)} micro-batches "
          f"of <= 4096 tokens: {fill:.1%} full (first fit over the last {PACKING_WINDOW} micro-batches)")
    assert fill > 0.9
    long_rows = pack_by_tokens([5000, 10, 4096], 4096, [0, 1, 2])
    assert long_rows == [[0], [1], [2]], "a row of the budget or more is a micro-batch of its own"


def test_the_stream_covers_each_epoch_once_with_the_same_micro_batches_in_a_new_order():
    rows = [{"input_ids": [1] * n, "n": i} for i, n in enumerate(_lengths(300, seed=1))]
    stream = MicroBatches(rows, batch_size=4, seed=0, collate=lambda batch: batch, batch_tokens=1024)
    again = MicroBatches(rows, batch_size=4, seed=0, collate=lambda batch: batch, batch_tokens=1024)
    epochs = [[stream.rows(p) for p in range(e * stream.per_epoch, (e + 1) * stream.per_epoch)] for e in (0, 1)]
    for epoch in epochs:
        assert sorted(r["n"] for batch in epoch for r in batch) == list(range(300))
        assert all(sum(row_tokens(r) for r in batch) <= 1024 or len(batch) == 1 for batch in epoch)
    assert epochs[0] != epochs[1] and sorted(map(str, epochs[0])) == sorted(map(str, epochs[1])), \
        "the next epoch shuffles the same micro-batches"
    assert [again.rows(p) for p in range(stream.per_epoch)] == epochs[0], "the same stream in another process"
    assert stream.per_epoch < MicroBatches(rows, 4, 0, lambda b: b).per_epoch, "short rows fill a micro-batch"


def _tree(model_dir, folder, **training):
    return task_tree("sft", model_dir, folder, **{"batch_tokens": 100, "grad_accum": 2, "save_every": 3, **training})


def test_an_epoch_trains_every_row_once_and_the_log_says_rows_and_tokens(tiny_model_dir, tmp_path, caplog):
    import logging

    tree = _tree(tiny_model_dir, tmp_path, max_steps=None, epochs=1)
    with caplog.at_level(logging.INFO):
        run = recipe_for("sft")(build_config(tree))
    records = step_records(run.run_dir)
    rows = int(re.search(r"data: (\d+) training rows", caplog.text).group(1))
    assert sum(r["rows"] for r in records) == rows, "each training row once"
    packs = int(re.search(r"training.batch_tokens 100: (\d+) micro-batches an epoch", caplog.text).group(1))
    assert packs < rows and len(records) == math.ceil(packs / 2), "an epoch's steps: its micro-batches / grad_accum"
    assert records[-1]["epoch"] == 1.0 and "% full" in caplog.text
    assert all(r["tokens"] <= 2 * 100 or r["rows"] <= 2 for r in records)
    assert "rows, " in caplog.text and " tokens  " in caplog.text, "each step's line says its rows and tokens"


def test_a_stopped_run_resumes_exactly(tiny_model_dir, tmp_path):
    straight = recipe_for("sft")(build_config(_tree(tiny_model_dir, tmp_path / "straight"))).run_dir
    tree = _tree(tiny_model_dir, tmp_path / "stopped")
    config = write_config(tree, tmp_path / "stopped" / "run.yaml")
    child = train_child(config, {"at": "loss", "count": 7})  # step 4's first micro-batch
    assert child.returncode == 143, child.stderr[-3000:]
    assert status(tmp_path / "stopped" / "runs" / "tiny")["step"] == 4
    resumed = recipe_for("sft")(build_config(yaml.safe_load(config.read_text())), resume=True).run_dir
    assert [r["rows"] for r in step_records(resumed)] == [r["rows"] for r in step_records(straight)]
    assert [r["loss"] for r in step_records(resumed)] == pytest.approx([r["loss"] for r in step_records(straight)],
                                                                       abs=1e-6)
    assert_same_weights(model_weights(resumed), model_weights(straight))


@pytest.mark.parametrize("change, message", [
    ({"batch_tokens": 8}, "at least 16"),
    ({"batch_tokens": 512, "task": "grpo"}, "task grpo batches prompts"),
    ({"batch_tokens": 512, "replay": True}, "with data.replay"),
])
def test_what_cannot_be_packed_by_tokens_is_refused(change, message, tiny_model_dir, tmp_path):
    tree = task_tree("grpo" if change.get("task") else "sft", tiny_model_dir, tmp_path,
                     batch_tokens=change["batch_tokens"])
    if change.get("replay"):
        tree["data"]["replay"] = {"path": tree["data"]["train"], "share": 0.5}
    with pytest.raises(ConfigError, match=message):
        build_config(tree)


def _accelerator(device: str, processes: int = 1):
    from types import SimpleNamespace

    import torch

    return SimpleNamespace(device=torch.device(device), num_processes=processes)


def test_auto_is_rows_on_cpu_and_the_most_tokens_that_fit_on_a_gpu(tiny_model_dir, tmp_path, monkeypatch):
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.recipes.base import batch_tokens_for

    config = build_config(task_tree("sft", tiny_model_dir, tmp_path))
    assert config.training.batch_tokens is None, "batch_size written in the config: rows"
    tree = task_tree("sft", tiny_model_dir, tmp_path)
    del tree["training"]["batch_size"]
    config = build_config(tree)
    assert config.training.batch_tokens == "auto"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert batch_tokens_for(config, model, _accelerator("cpu")) is None, "auto on CPU: batch_size rows"
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=2 * est.GiB))
    on_gpu = batch_tokens_for(config, model, _accelerator("cuda"))
    assert on_gpu in est.BATCH_TOKEN_CHOICES, "auto on a GPU: the most tokens the estimate fits"
    checkpoint = tmp_path / "step-0000003"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text('{"batch_tokens": 2048}')
    assert batch_tokens_for(config, model, _accelerator("cuda"), checkpoint) == 2048, "a resume keeps its budget"
    (checkpoint / "trainer_state.json").write_text('{"global_step": 3}')  # from before batch_tokens: rows
    assert batch_tokens_for(config, model, _accelerator("cuda"), checkpoint) is None

    arch = est.Architecture("llama", 4096, 14336, 32, 32, 8, 128, 128256, tied=False)  # Llama 3 8B's shape
    tree["data"]["max_seq_len"] = 4096
    plan = est.plan_from_config(build_config(tree), arch, device="cuda")
    chosen = est.fitting_batch_tokens(arch, plan, 4096, 80 * est.GiB)
    assert chosen in est.BATCH_TOKEN_CHOICES
    bigger = est.tokens_as_rows(2 * chosen, 4096)
    assert est.estimate_memory(arch, dataclasses.replace(plan, micro_batch=bigger[0], seq_len=bigger[1])).peak \
        > est.FIT_SHARE * 80 * est.GiB
    assert est.fitting_batch_tokens(arch, plan, 4096, 200 * est.GiB) > chosen
    print(f"\n8B LoRA on an 80 GiB GPU: training.batch_tokens auto -> {chosen:,} tokens per micro-batch")


def test_a_saved_config_reads_back_with_the_same_batching(tiny_model_dir, tmp_path):
    from tunesmith.config.load import dump_config

    for set_rows in (True, False):
        tree = task_tree("sft", tiny_model_dir, tmp_path)
        if not set_rows:
            del tree["training"]["batch_size"]
        config = build_config(tree)
        again = build_config(yaml.safe_load(dump_config(config)))
        assert again.training.batch_tokens == config.training.batch_tokens == (None if set_rows else "auto")


def test_padded_micro_batches_count_their_padding():
    lengths = [3000] + [50] * 20
    packs = pack_by_tokens(lengths, 4096, list(range(len(lengths))), padded=True)
    assert all(len(pack) * max(lengths[i] for i in pack) <= 4096 or len(pack) == 1 for pack in packs)
    assert [len(p) for p in packs] == [1, 20], "the long row alone: padded to it, 21 rows would cost 63,000"


def test_several_processes_get_whole_packs_within_the_budget():
    from tunesmith.train.loop import _packed_window

    rows = [{"input_ids": [1] * n, "labels": [1] * n, "n": i} for i, n in enumerate([4000] + [100] * 40)]
    stream = MicroBatches(rows, batch_size=4, seed=0, collate=lambda batch: {"rows": batch}, batch_tokens=4096)
    windows = [_packed_window(stream, 0, 1, None, process, 2) for process in range(2)]
    assert [len(w) for w in windows] == [1, 1]
    for window in windows:
        assert sum(len(r["input_ids"]) for r in window[0]["rows"]) <= 4096
    trained = sorted(r["n"] for window in windows for r in window[0]["rows"])
    assert trained == sorted(r["n"] for p in range(2) for r in stream.rows(p)), "the step's rows, each once"
