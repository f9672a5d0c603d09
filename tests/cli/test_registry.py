"""The registry round trip: add -> promote -> `chat registry:NAME@ALIAS` loads that version, with
lineage (data SHA-256, base model) and evaluations on it; eval of a tracked run reaches MLflow."""

import shutil

import pytest
import torch

from tunesmith.cli.main import main
from tunesmith.config.load import build_config
from tunesmith.io import sha256_of
from tunesmith.targets import load_target
from tunesmith.recipes.sft import run_sft
from tunesmith.tracking import read_tracking
from helpers import counting_rows, tiny_tree, write_jsonl

mlflow = pytest.importorskip("mlflow", reason="mlflow is a core dependency; install the project")


def _lora_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_add_promote_and_chat_with_a_registered_version(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the registry's default store: ./runs/mlflow.db
    data = write_jsonl(tmp_path / "count.jsonl", counting_rows(12))
    runs = {}
    for name, lr, backends in (("first", 5e-3, ["mlflow"]), ("second", 2e-2, [])):
        tree = tiny_tree(tiny_model_dir, data, tmp_path / "runs", "lora", max_steps=3, lr=lr)
        tree["name"], tree["tracking"] = name, {"backends": backends}
        runs[name] = run_sft(build_config(tree)).run_dir

    # An evaluation of the tracked run goes to its MLflow run, and onto the version as a tag.
    assert main(["eval", str(runs["first"]), "--data", str(data), "--metrics", "loss", "--bootstrap", "0",
                 "--device", "cpu"]) == 0
    ids = read_tracking(runs["first"])["mlflow"]
    client = mlflow.MlflowClient(ids["uri"])
    eval_loss = client.get_run(ids["run_id"]).data.metrics["eval/count/loss"]

    assert main(["registry", "add", str(runs["first"]), "--name", "bot", "--alias", "staging"]) == 0
    assert main(["registry", "add", str(runs["second"]), "--name", "bot"]) == 0  # untracked: a run is made for it
    assert "bot version 2" in capsys.readouterr().out
    first = client.get_model_version("bot", "1")
    assert first.run_id == ids["run_id"]
    assert first.tags["data.train.0.sha256"] == sha256_of(data) and first.tags["base_model"] == str(tiny_model_dir)
    assert float(first.tags["eval.eval-count/loss"]) == pytest.approx(eval_loss)
    second = client.get_model_version("bot", "2")
    assert second.run_id != ids["run_id"] and client.get_run(second.run_id).data.params["training.lr"] == "0.02"

    assert main(["registry", "promote", "bot", "2", "production"]) == 0
    assert main(["registry", "promote", "bot", "1", "production"]) == 0
    assert "bot@production -> version 1 (was version 2)" in capsys.readouterr().out
    assert main(["registry", "list"]) == 0
    listing = capsys.readouterr().out
    assert any(line.split()[:3] == ["bot", "1", "production,staging"] for line in listing.splitlines())

    # Registering the same (tracked) run again, after its folder changed, leaves version 1 as it was.
    from tunesmith.registry import resolve

    registered = (resolve("registry:bot/1") / "summary.json").read_text()
    summary = runs["first"] / "summary.json"
    summary.write_text(summary.read_text().replace('"steps": 3', '"steps": 30'))
    assert main(["registry", "add", str(runs["first"]), "--name", "other"]) == 0
    assert (resolve("registry:bot/1") / "summary.json").read_text() == registered
    assert '"steps": 30' in (resolve("registry:other/1") / "summary.json").read_text()
    assert main(["registry", "promote", "bot", "1", "latest"]) == 1  # MLflow's reserved alias, refused first
    assert "reserves 'latest'" in capsys.readouterr().err

    trained = _lora_weights(load_target(str(runs["first"]), "cpu")[0])
    other = _lora_weights(load_target(str(runs["second"]), "cpu")[0])
    assert main(["-q", "chat", str(runs["first"]), "--prompt", "Count to 3.", "--max-new-tokens", "6",
                 "--device", "cpu"]) == 0
    reply = capsys.readouterr().out
    shutil.rmtree(runs["first"])  # a version is a copy: it outlives its run folder
    loaded = _lora_weights(load_target("registry:bot@production", "cpu")[0])
    assert loaded.keys() == trained.keys()
    for key in trained:
        torch.testing.assert_close(loaded[key], trained[key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(loaded[k], other[k]) for k in trained)
    assert main(["-q", "chat", "registry:bot@production", "--prompt", "Count to 3.", "--max-new-tokens", "6",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out == reply
    torch.testing.assert_close(_lora_weights(load_target("registry:bot/2", "cpu")[0])[next(iter(other))],
                               other[next(iter(other))])


def test_unknown_names_and_unfinished_runs_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["chat", "registry:nobody@production", "--prompt", "hi"]) == 1
    assert "no model registry at sqlite:///" in capsys.readouterr().err
    run = tmp_path / "runs" / "half"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: half\n")
    assert main(["registry", "add", str(run), "--name", "bot"]) == 1
    assert "only a finished run can be registered" in capsys.readouterr().err
    assert main(["chat", "registry:bad name", "--prompt", "hi"]) == 1
    assert "write registry:NAME@ALIAS" in capsys.readouterr().err
