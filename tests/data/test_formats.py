import json


from tunesmith.data.build import DataReport, read_canonical
from tunesmith.data.formats import to_canonical
from tunesmith.data.readers import read_rows
from tunesmith.config.schema import DatasetConfig
from helpers import write_jsonl


def problems_of(row, fmt):
    return [(p.field, p.message, p.severity) for p in to_canonical(row, fmt)[1]]


def test_openai_role_order_and_content_checks():
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                        {"role": "assistant", "content": "  "}, {"role": "system", "content": "s"}]}
    found = problems_of(row, "openai")
    assert ("messages[1].role", "two user turns in a row (messages[0] and messages[1]); merge them or insert the "
            "missing turn", "error") in found
    assert any(f == "messages[2].content" and "empty or whitespace" in m for f, m, _ in found)
    assert any(f == "messages[3].role" and "system turn may only come first" in m for f, m, _ in found)
    unknown = problems_of({"messages": [{"role": "robot", "content": "x"}]}, "openai")
    assert unknown[0][0] == "messages[0].role" and "unknown role 'robot'" in unknown[0][1]
    assert problems_of({"messages": [{"role": "user", "content": "q"}]}, "openai")[0][1] == \
        "row has no assistant turn: nothing to train on"


def test_formats_convert_to_the_same_messages():
    expected = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"}]
    openai, _ = to_canonical({"messages": expected}, "openai")
    sharegpt, _ = to_canonical({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                                                  {"from": "gpt", "value": "A"}]}, "sharegpt")
    alpaca, _ = to_canonical({"system": "S", "instruction": "Q", "input": "", "output": "A"}, "alpaca")
    assert openai["messages"] == sharegpt["messages"] == alpaca["messages"] == expected
    assert to_canonical({"text": "raw"}, "text")[0] == {"text": "raw"}


def test_alpaca_missing_and_wrong_fields():
    found = problems_of({"instruction": "", "input": 3}, "alpaca")
    assert ("instruction", "is empty; fill it in or drop the row", "error") in found
    assert ("output", "missing", "error") in found
    assert ("input", "must be a string, got int", "error") in found


def test_malformed_json_is_reported_with_its_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": broken}\n{"text": "fine"}\n')
    rows = list(read_rows(path))
    assert [(r.line, r.error is None) for r in rows] == [(1, True), (3, False), (4, True)]
    assert rows[1].error.startswith("malformed JSON at column 10")
    array = tmp_path / "rows.json"
    array.write_text('[\n  {"text": "a"},\n  {"text": "b"}\n,\n  {"text": \n]')
    rows = list(read_rows(array))
    assert [r.line for r in rows[:2]] == [2, 3] and rows[2].error.startswith("malformed JSON")


def test_csv_and_parquet_rows_are_read(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"instruction": ["a", "b"], "input": ["", "x"], "output": ["1", "2"]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    for name, first_line in (("d.csv", 2), ("d.parquet", 1)):
        rows = list(read_rows(tmp_path / name))
        assert [r.line for r in rows] == [first_line, first_line + 1]
        assert rows[1].value["instruction"] == "b"


def test_mixed_formats_and_unknown_rows_name_the_line(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"instruction": "q", "output": "a"},
        {"question": "?"},
    ])
    report = DataReport()
    rows = read_canonical(DatasetConfig(path=str(path)), report)
    assert len(rows) == 1
    report = DataReport()
    read_canonical(DatasetConfig(path=str(write_jsonl(tmp_path / "u.jsonl", [{"question": "?"}]))), report)
    assert report.errors[0].startswith(f"{tmp_path / 'u.jsonl'}:1: row: none of the fields messages, conversations")
    report = DataReport()
    read_canonical(DatasetConfig(path=str(path)), report)
    assert report.errors[0] == f"{path}:2: row: is in alpaca format but the file is in openai format (from line 1); " \
                               "one format per file"
    assert report.errors[1] == f"{path}:3: messages: missing (the file is in OpenAI chat format)"


def test_flawed_openai_file_from_shared_data(shared_data):
    path = shared_data / "openai_toy_chat_flawed.jsonl"
    report = DataReport()
    read_canonical(DatasetConfig(path=str(path)), report)
    assert report.errors == [f'{path}:4: messages[1].role: row has no user turn before the assistant turn '
                             f'(messages[0].role is "system", messages[1].role is "assistant")']
    assert report.warnings == [f"{path}:5: messages[2].content: assistant reply is 'Eat a banana!' repeated 2000 "
                               f"times (26000 characters); likely a generation loop"]
    assert json.loads(path.read_text().splitlines()[3])["messages"][1]["role"] == "assistant"


def test_unknown_turn_fields_are_warned_about():
    row = {"messages": [{"role": "user", "content": "q", "lang": "en"}, {"role": "assistant", "content": "a"}]}
    canonical, problems = to_canonical(row, "openai")
    assert canonical is not None
    assert [(p.field, p.message, p.severity) for p in problems] == [
        ("messages[0]", "unknown field(s) 'lang'; they are ignored", "warning")]


def test_csv_numbers_and_null_inputs_are_read_as_text(tmp_path):
    (tmp_path / "qa.csv").write_text("question,answer\n2+2?,4\n3+3?,6\n")
    report = DataReport()
    rows = read_canonical(DatasetConfig(path=str(tmp_path / "qa.csv")), report)
    assert not report.errors and rows[1].row["messages"][1]["content"] == "6"
    (tmp_path / "a.json").write_bytes(b'\xef\xbb\xbf[{"instruction": "Say hi", "input": null, "output": "hi"}]')
    report = DataReport()
    rows = read_canonical(DatasetConfig(path=str(tmp_path / "a.json")), report)  # BOM and a null input
    assert not report.errors and rows[0].row["messages"][0]["content"] == "Say hi"
