"""The command line as a user meets it: exit codes, named errors, no run folder on bad input."""

import subprocess
import sys

import yaml

from tunesmith.cli.main import main
from helpers import tiny_tree


def write_config(path, tree):
    path.write_text(yaml.safe_dump(tree))
    return path


def test_flawed_dataset_is_rejected_before_training(shared_data, tiny_model_dir, tmp_path, capsys):
    flawed = shared_data / "openai_toy_chat_flawed.jsonl"
    tree = tiny_tree(tiny_model_dir, flawed, tmp_path / "runs")
    tree["data"]["max_seq_len"] = 512
    code = main(["train", str(write_config(tmp_path / "c.yaml", tree))])
    err = capsys.readouterr().err
    assert code == 2
    assert (f'{flawed}:4: messages[1].role: row has no user turn before the assistant turn '
            f'(messages[0].role is "system", messages[1].role is "assistant")') in err
    assert f"{flawed}:5: row: over-long" in err and "> data.max_seq_len 512; truncated" in err
    assert f"{flawed}:5: messages[2].content: assistant reply is 'Eat a banana!' repeated 2000 times" in err
    assert "nothing was trained" in err
    assert not (tmp_path / "runs").exists()


def test_bad_config_lists_every_problem_and_creates_nothing(tiny_model_dir, chat_file, tmp_path):
    tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs")
    tree["training"].update({"lr": 0, "batch_sise": 4})
    tree["method"]["type"] = "lorra"
    path = write_config(tmp_path / "bad.yaml", tree)
    for command in (["train", str(path)], ["config", "validate", str(path)]):
        result = subprocess.run([sys.executable, "-m", "tunesmith", *command], capture_output=True, text=True)
        assert result.returncode == 2, result.stderr
        assert "invalid config (3 problems)" in result.stderr
        assert "training.lr: 0 is invalid: Input should be greater than 0" in result.stderr
        assert "training.batch_sise: unknown field (value 4); did you mean 'training.batch_size'?" in result.stderr
        assert "method.type: 'lorra' is invalid: Input should be 'full', 'freeze', 'lora'" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_config_validate_accepts_a_good_config_with_overrides(tiny_model_dir, chat_file, tmp_path, capsys):
    path = write_config(tmp_path / "ok.yaml", tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs"))
    assert main(["config", "validate", str(path), "training.lr=1e-4", "--show"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.0001" in out and out.rstrip().endswith("valid")


def test_existing_run_is_never_overwritten_silently(tiny_model_dir, chat_file, tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", max_steps=2))
    assert main(["train", str(path)]) == 0
    assert main(["train", str(path)]) == 1
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert main(["train", str(path), "--overwrite", "training.max_steps=3"]) == 0


def test_train_then_chat_with_the_run(tiny_model_dir, chat_file, tmp_path, capsys):
    """30 steps on the counting rows teach the tiny random model to count: chat with each run
    replies "1 2 3 ...", where the untrained model replies with random tokens. Catches a chat that
    does not answer with the trained weights, which a non-empty reply does not: seen failing with
    the run's adapter left off in models.inference._load_adapter (lora: the base's random tokens).
    (The tiny model learns the counting, not where to stop: "1 2 3 4 5 6 7 8" for "Count to 3.")"""
    def chat(target: str) -> str:
        capsys.readouterr()
        assert main(["-q", "chat", target, "--prompt", "Count to 3.", "--max-new-tokens", "8"]) == 0
        return capsys.readouterr().out.strip()

    assert not chat(str(tiny_model_dir)).startswith("1 2")
    lrs = {"lora": 2e-2, "qlora": 2e-2, "full": 3e-3}
    for method, lr in lrs.items():
        tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", method, max_steps=30, lr=lr)
        tree["name"] = method
        assert main(["train", str(write_config(tmp_path / f"{method}.yaml", tree))]) == 0
        reply = chat(str(tmp_path / "runs" / method))
        assert reply.startswith("1 2 3 4"), f"{method}: {reply!r}"


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tiny_model_dir, chat_file, tmp_path, capsys):
    precious = tmp_path / "runs" / "tiny"
    precious.mkdir(parents=True)
    (precious / "notes.txt").write_text("keep me")
    path = write_config(tmp_path / "c.yaml", tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", max_steps=2))
    assert main(["train", str(path), "--overwrite"]) == 1
    assert "is not a tunesmith run folder" in capsys.readouterr().err
    assert (precious / "notes.txt").read_text() == "keep me"


def test_resume_without_a_checkpoint_restarts_and_keeps_metrics_single(tiny_model_dir, chat_file, tmp_path):
    from helpers import read_metrics

    tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", max_steps=3, save_every=None)
    path = write_config(tmp_path / "c.yaml", tree)
    assert main(["train", str(path)]) == 0
    assert main(["train", str(path), "--resume"]) == 0
    steps = [r["step"] for r in read_metrics(tmp_path / "runs" / "tiny") if "loss" in r]
    assert steps == [1, 2, 3]
    assert oct((tmp_path / "runs" / "tiny" / "summary.json").stat().st_mode & 0o044) == oct(0o044)
