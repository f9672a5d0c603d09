"""`tunesmith runs list | show | compare`: tables from the run folders, and the overlaid loss curves."""

import json
import re

import pytest

from tunesmith.cli.main import main
from tunesmith.config.load import build_config
from tunesmith.recipes.sft import run_sft
from tunesmith.train.run import write_status
from tunesmith.runs import read_run, sparkline
from helpers import read_metrics, tiny_tree


@pytest.fixture(scope="module")
def two_runs(tiny_model_dir, tmp_path_factory):
    from helpers import counting_rows, write_jsonl

    folder = tmp_path_factory.mktemp("runs-cli")
    data = write_jsonl(folder / "train.jsonl", counting_rows(20))
    runs = []
    for name, lr in (("slow", 1e-3), ("fast", 5e-3)):
        tree = tiny_tree(tiny_model_dir, data, folder / "runs", "lora", max_steps=4, lr=lr, eval_every=2)
        tree["name"], tree["data"]["eval_fraction"] = name, 0.2
        runs.append(run_sft(build_config(tree)).run_dir)
    return runs


def test_list_shows_every_run_with_its_result(two_runs, capsys):
    assert main(["runs", "list", "--dir", str(two_runs[0].parent)]) == 0
    out = capsys.readouterr().out
    for run_dir in two_runs:
        summary = json.loads((run_dir / "summary.json").read_text())
        line = next(line for line in out.splitlines() if line.startswith(run_dir.name + " "))
        assert f"{summary['final_train_loss']:.4g}" in line and f"{summary['final_eval_loss']:.4g}" in line
        assert "finished" in line and "lora r8" in line


def test_show_reads_an_unfinished_run_too(two_runs, tmp_path, capsys):
    assert main(["runs", "show", str(two_runs[1])]) == 0
    out = capsys.readouterr().out
    losses = [r["loss"] for r in read_metrics(two_runs[1]) if "loss" in r]
    assert f"{losses[0]:.4g} → {losses[-1]:.4g}" in out and sparkline(losses) in out
    (two_runs[1] / "summary.json").rename(tmp_path / "summary.json")  # as if it were still training
    (two_runs[1] / "status.json").rename(tmp_path / "status.json")
    try:
        write_status(two_runs[1], "running")  # this process's id and host: a live run
        assert read_run(two_runs[1]).status == "running (step 4)"
    finally:
        (tmp_path / "summary.json").rename(two_runs[1] / "summary.json")
        (tmp_path / "status.json").rename(two_runs[1] / "status.json")


def test_compare_shows_what_differs_and_overlays_the_curves(two_runs, tmp_path, capsys):
    page = tmp_path / "compare.html"
    assert main(["runs", "compare", *map(str, two_runs), "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^training\.lr\s+0\.001\s+0\.005\s*$", out, re.MULTILINE)
    assert not re.search(r"^training\.max_steps", out, re.MULTILINE)  # the same in both: not shown
    html = page.read_text()
    train_chart = html[html.index("train loss"):html.index("eval loss")]
    assert train_chart.count("<polyline") == 2 and ">slow<" in train_chart and ">fast<" in train_chart


def test_a_folder_that_is_not_a_run_is_named(tmp_path, capsys):
    assert main(["runs", "show", str(tmp_path)]) == 1
    assert "not a run folder" in capsys.readouterr().err
