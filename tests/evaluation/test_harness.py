"""`tunesmith eval --harness`: a local JSONL task through lm-evaluation-harness, offline; a task whose
data is on the hub fails with a clear message before the model loads."""

import json

import pytest

from tunesmith.cli.main import main
from tunesmith.errors import DataError, TunesmithError
from tunesmith.evaluation import metrics as m
from tunesmith.evaluation.harness import HarnessOptions, load_tasks
from helpers import write_jsonl

pytest.importorskip("lm_eval", reason="lm-eval is in the test extra: pip install -e '.[test]'")


@pytest.fixture
def offline(monkeypatch):
    """No hub: what this machine is like, made explicit so that nothing waits on a network."""
    import datasets.config
    import huggingface_hub.constants

    for module, name in ((datasets.config, "HF_DATASETS_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
                         (huggingface_hub.constants, "HF_HUB_OFFLINE")):
        monkeypatch.setattr(module, name, True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


ROWS = [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
        {"question": "What is 10 - 4?", "answer": "#### 6"},
        {"question": "Tom has 3 apples and eats one. How many are left?", "answer": "#### 2"}]


REPLIES = {"What is 2 + 3?": "2 plus 3 makes 5.", "What is 10 - 4?": "It is 7", "Tom has": "#### 2"}


def test_a_local_jsonl_task_runs_offline_and_scores_with_tunesmiths_exact_match(tiny_model_dir, tmp_path, offline,
                                                                                 monkeypatch, capsys):
    from lm_eval.models.huggingface import HFLM

    real = HFLM.generate_until
    generated = []

    def scripted(self, requests, disable_tqdm=False):
        """The tiny model's own replies are checked, then replaced by replies whose scores are known."""
        generated.extend(real(self, requests, disable_tqdm))
        return [next(reply for start, reply in REPLIES.items() if start in r.args[0]) for r in requests]

    monkeypatch.setattr(HFLM, "generate_until", scripted)
    rows = write_jsonl(tmp_path / "arith.jsonl", ROWS)
    out = tmp_path / "harness"
    assert main(["eval", str(tiny_model_dir), "--harness", str(rows), "--extract", "number", "--max-new-tokens", "6",
                 "--batch-size", "3", "--device", "cpu", "--out", str(out)]) == 0
    document = json.loads((out / "harness.json").read_text())
    assert document["tasks"] == ["tunesmith_arith"]
    samples = document["samples"]["tunesmith_arith"]
    assert [s["prompt"] for s in samples] == [r["question"] for r in ROWS]
    assert [s["target"] for s in samples] == [r["answer"] for r in ROWS]
    assert len(generated) == 3 and all(isinstance(g, str) for g in generated)  # the model did generate
    # "5" in a sentence and "#### 2" count by tunesmith's number extraction (lm-eval's own exact_match
    # would score both 0); "7" is wrong.
    assert [s["exact_match"] for s in samples] == [1.0, 0.0, 1.0]
    for sample in samples:
        assert sample["exact_match"] == m.exact_match(sample["reply"], sample["target"], "number")
    assert document["results"]["tunesmith_arith"]["exact_match,none"] == pytest.approx(2 / 3)
    assert "tunesmith_arith" in capsys.readouterr().out
    # The scorer lm-eval loaded from beside the task's YAML gives credit where the reply is right.
    import importlib.util

    spec = importlib.util.spec_from_file_location("task_utils", out / "tunesmith_task_utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    doc = {"target": "#### 1,200", "extract": "number", "normalise": []}
    assert utils.process_results(doc, ["so it is 1200."]) == {"exact_match": 1.0}
    assert utils.process_results(doc, ["about 120"]) == {"exact_match": 0.0}
    doc = {"target": "Paris", "extract": "none", "normalise": ["case", "punct"]}  # --normalize reaches the scorer
    assert utils.process_results(doc, ["paris."]) == {"exact_match": 1.0}
    assert utils.process_results({**doc, "normalise": []}, ["paris."]) == {"exact_match": 0.0}


def test_a_task_whose_data_is_on_the_hub_fails_clearly_before_the_model_loads(tmp_path, offline):
    task = tmp_path / "arc_copy.yaml"
    # A dataset id no cache holds: offline, it can only come from the hub.
    task.write_text("task: arc_copy\ndataset_path: tunesmith-tests/no-such-arc\ntest_split: test\n"
                    "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answerKey}}'\n"
                    "doc_to_choice: '{{choices.label}}'\nmetric_list: [{metric: acc}]\n")
    with pytest.raises(TunesmithError) as caught:
        load_tasks(HarnessOptions(tasks=[str(task)]), tmp_path / "out")
    message = str(caught.value)
    assert "--harness" in message and "arc_copy" in message and "tunesmith-tests/no-such-arc" in message
    assert "--harness ROWS.jsonl" in message  # the offline alternative


def test_bad_rows_of_a_local_task_are_named_before_anything_loads(tmp_path):
    rows = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"question": "no answer"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        load_tasks(HarnessOptions(tasks=[str(rows)]), tmp_path / "out")
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"question": "Capital of France?", "answer": "Paris"}])
    with pytest.raises(TunesmithError, match=r"plain.jsonl:1: --extract number"):
        load_tasks(HarnessOptions(tasks=[str(plain)], extract="number"), tmp_path / "out")


def test_harness_refuses_the_ab_flags(capsys):
    assert main(["eval", "embedded", "--harness", "x.jsonl", "--compare-base"]) != 0
    assert "--harness scores one model" in capsys.readouterr().err
