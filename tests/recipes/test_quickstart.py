"""The shipped quickstart on the real embedded SmolLM2-135M, for a few steps."""

import json

import pytest

from tunesmith.cli.main import main
from helpers import read_metrics

REPO_CONFIG = "configs/quickstart.yaml"


@pytest.mark.slow
def test_quickstart_trains_the_embedded_model_and_chats(tmp_path, capsys, monkeypatch):
    """Six steps of four rows teach the shipped quickstart's behaviour: a sentence about a person,
    none of whose name, age or city is in the data, comes back as the JSON record with the four
    fields. Catches a chat that does not answer with the trained model (the base SmolLM2 replies in
    prose: "Ana is a 30-year-old pilot in Oslo."), which a non-empty reply does not: seen failing
    with the run's adapter left off in models.inference._load_adapter. Three steps were not enough
    in a measurement (prose); four gave this record."""
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    code = main(["train", REPO_CONFIG, f"output.dir={tmp_path}", "training.max_steps=6", "training.batch_size=4",
                 "training.warmup_steps=1", "training.eval_every=3", "training.save_every=2"])
    assert code == 0
    run_dir = tmp_path / "quickstart"
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "lora" and 0 < summary["trainable_parameters"] < summary["total_parameters"] / 10
    assert (run_dir / "checkpoints" / "step-0000002").is_dir()
    capsys.readouterr()
    assert main(["-q", "chat", str(run_dir), "--prompt", "Ana is a 30-year-old pilot in Oslo.",
                 "--max-new-tokens", "40"]) == 0
    reply = capsys.readouterr().out.strip()
    assert reply.startswith("{"), reply
    assert json.loads(reply) == {"name": "Ana", "age": 30, "city": "Oslo", "job": "pilot"}, reply
