"""The shipped quickstart on the real embedded SmolLM2-135M, for a few steps."""

import json

import pytest

from tunesmith.cli.main import main
from helpers import read_metrics

REPO_CONFIG = "configs/quickstart.yaml"


@pytest.mark.slow
def test_quickstart_trains_the_embedded_model_and_chats(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    code = main(["train", REPO_CONFIG, f"output.dir={tmp_path}", "training.max_steps=3", "training.batch_size=2",
                 "training.eval_every=3", "training.save_every=2"])
    assert code == 0
    run_dir = tmp_path / "quickstart"
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "lora" and 0 < summary["trainable_parameters"] < summary["total_parameters"] / 10
    assert (run_dir / "checkpoints" / "step-0000002").is_dir()
    capsys.readouterr()
    assert main(["-q", "chat", str(run_dir), "--prompt", "Ana is a 30-year-old pilot in Oslo.",
                 "--max-new-tokens", "40"]) == 0
    assert capsys.readouterr().out.strip()
