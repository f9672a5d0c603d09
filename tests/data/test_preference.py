import gzip
import json

from tunesmith.config.schema import DatasetConfig
from tunesmith.data.build import DataReport, read_canonical
from tunesmith.data.formats import detect_format, to_canonical
from helpers import write_jsonl


def test_three_preference_formats_give_the_same_canonical_row():
    prompt = [{"role": "user", "content": "Is the sky blue?"}]
    expected = {"prompt": prompt, "chosen": "Yes, on a clear day.", "rejected": "No."}
    rows = {
        "preference": {"prompt": "Is the sky blue?", "chosen": "Yes, on a clear day.", "rejected": "No."},
        "openai_preference": {"input": {"messages": prompt},
                              "preferred_output": [{"role": "assistant", "content": "Yes, on a clear day."}],
                              "non_preferred_output": [{"role": "assistant", "content": "No."}]},
        "hh": {"chosen": "\n\nHuman: Is the sky blue?\n\nAssistant: Yes, on a clear day.",
               "rejected": "\n\nHuman: Is the sky blue?\n\nAssistant: No."},
    }
    for fmt, row in rows.items():
        assert detect_format(row) == fmt
        canonical, problems = to_canonical(row, fmt)
        assert canonical == expected and not problems, fmt


def test_preference_faults_name_the_field(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "2+2?", "chosen": "4", "rejected": "4"},
        {"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "  ", "rejected": "b"},
    ])
    report = DataReport()
    assert read_canonical(DatasetConfig(path=str(path)), report) == []
    assert report.errors == [
        f"{path}:1: rejected: chosen and rejected are identical: the pair teaches nothing; drop it",
        f"{path}:2: prompt: the prompt must end with a user turn, not 'assistant'",
        f"{path}:3: chosen: the reply is empty or whitespace only",
    ]


def test_anthropic_hh_sample_reads_with_its_real_faults_named(shared_data):
    path = shared_data / "hh_rlhf_harmless_sample.jsonl.gz"
    report = DataReport()
    rows = read_canonical(DatasetConfig(path=str(path)), report)
    assert len(rows) == 1790 and report.formats[str(path)] == "hh"
    lines = [int(e.split(":")[1]) for e in report.errors]
    assert lines == [28, 398, 564, 572, 844, 857, 921, 1198, 1323, 1709]
    raw = json.loads(gzip.open(path, "rt").read().splitlines()[1322])
    assert "  Human:" in raw["chosen"]  # line 1323: a Human turn glued into the reply without "\n\n"
    assert any("1323: rejected: chosen and rejected transcripts differ before their last turn" in e
               for e in report.errors)
    first = rows[0].row
    assert first["prompt"][-1]["role"] == "user" and first["chosen"] != first["rejected"]
