"""`tunesmith data ...` on real files and fixtures: exact rows and lines reported."""

import json

import yaml

from tunesmith.cli.main import main
from helpers import write_jsonl


def run(capsys, *argv):
    code = main(["-q", "data", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_validate_flawed_file_names_lines_4_and_5(shared_data, capsys):
    path = shared_data / "openai_toy_chat_flawed.jsonl"
    code, out, _ = run(capsys, "validate", str(path), "--model", "embedded", "--max-seq-len", "512", "--json")
    assert code == 2
    report = json.loads(out)
    assert [(e["line"], e["field"]) for e in report["errors"]] == [(4, "messages[1].role")]
    assert report["errors"][0]["message"].startswith("row has no user turn before the assistant turn")
    assert [(w["line"], w["field"]) for w in report["warnings"]] == [(5, "messages[2].content"), (5, "row")]
    assert report["warnings"][1]["message"].startswith("over-long, 8033 tokens > data.max_seq_len 512")


def test_validate_strict_fails_on_warnings_and_train_prints_the_same_messages(tmp_path, capsys, tiny_model_dir):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 2
    path = write_jsonl(tmp_path / "dup.jsonl", rows)
    code, out, _ = run(capsys, "validate", str(path))
    assert code == 0 and f"warning: {path}:2: row: duplicate of line 1" in out
    assert run(capsys, "validate", str(path), "--strict")[0] == 2
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                             {"role": "assistant", "content": " "}]}])
    _, out, _ = run(capsys, "validate", str(bad))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": str(bad)},
                                      "output": {"dir": str(tmp_path / "runs")}}))
    assert main(["train", str(config)]) == 2
    train_err = capsys.readouterr().err
    message = f"{bad}:1: messages[1].content: assistant reply is empty or whitespace only"
    assert f"error: {message}" in out and message in train_err


def test_every_command_on_the_real_files(shared_data, tmp_path, capsys):
    alpaca = str(shared_data / "alpaca_cleaned_sample.json")
    for name in ("alpaca_cleaned_sample.json", "alpaca_seed_tasks.jsonl", "gsm8k_train.jsonl"):
        assert run(capsys, "validate", str(shared_data / name))[0] == 0, name

    code, out, _ = run(capsys, "stats", alpaca, "--max-seq-len", "256", "--json", "--plot", str(tmp_path / "s.html"))
    stats = json.loads(out)
    assert code == 0 and stats["rows"] == 102
    total = stats["tokens"]["total"]
    assert total["min"] <= total["median"] <= total["p95"] <= total["max"]
    assert 0 < stats["truncated_share"] < 0.2 and stats["training_tokens_per_epoch"] <= 102 * 256
    assert "<svg" in (tmp_path / "s.html").read_text()

    code, out, _ = run(capsys, "preview", alpaca, "-n", "1")
    assert code == 0 and "[[1. Eat a balanced diet" in out and out.rstrip().endswith("<|im_end|>]]")

    code, out, _ = run(capsys, "convert", str(shared_data / "hh_rlhf_harmless_sample.jsonl.gz"),
                       str(tmp_path / "pref.jsonl"), "--to", "preference")
    assert code == 2, "a file with errors is refused, not silently thinned"

    converted = tmp_path / "alpaca.openai.jsonl"
    assert run(capsys, "convert", alpaca, str(converted), "--to", "openai")[0] == 0
    back = tmp_path / "back.sharegpt.jsonl"
    assert run(capsys, "convert", str(converted), str(back), "--to", "sharegpt")[0] == 0
    first = json.loads(back.read_text().splitlines()[0])
    assert first["conversations"][0] == {"from": "human", "value": "Give three tips for staying healthy."}

    code, out, _ = run(capsys, "split", str(shared_data / "gsm8k_train.jsonl"), "--val", "0.1", "--test", "0.1",
                       "--near", "0.9", "--out-dir", str(tmp_path / "splits"))
    sizes = {name: (tmp_path / "splits" / f"gsm8k_train.{name}.jsonl").read_text().count("\n")
             for name in ("train", "val", "test")}
    assert code == 0 and sum(sizes.values()) == 7473 and abs(sizes["val"] - 747) <= 20

    code, out, _ = run(capsys, "dedup", str(shared_data / "alpaca_seed_tasks.jsonl"), str(tmp_path / "dd.jsonl"),
                       "--near", "0.9")
    assert code == 0 and "of 175 rows" in out


def test_mix_writes_provenance(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"a{i}", "output": "x", "topic": "t" + str(i % 2)}
                                       for i in range(10)])
    write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(4)])
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({"output": "mixed.jsonl", "seed": 1, "sources": [  # beside the YAML
        {"path": "a.jsonl", "max_rows": 6, "category_column": "topic", "category_cap": 4},
        {"path": "b.jsonl", "weight": 2.0, "name": "raw"}]}))
    code, out, _ = run(capsys, "mix", str(config))
    rows = [json.loads(line) for line in (tmp_path / "mixed.jsonl").read_text().splitlines()]
    assert code == 0 and len(rows) == 14
    assert sum(r["_source"].startswith("a.jsonl:") for r in rows) == 6
    assert sum(r["_source"].startswith("raw:") for r in rows) == 8
    config.write_text(yaml.safe_dump({"output": "x.jsonl", "sources": [{"path": "a.jsonl", "wieght": 2}]}))
    code, _, err = run(capsys, "mix", str(config))
    assert code == 2 and "sources[0].wieght: unknown field (value 2); did you mean 'sources[0].weight'?" in err


def test_chunk_raw_text_with_overlap(tmp_path, capsys):
    text = " ".join(f"word{i}" for i in range(400))
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"text": text}, {"text": "short doc"}])
    code, out, _ = run(capsys, "chunk", str(path), str(tmp_path / "chunks.jsonl"), "--max-seq-len", "128",
                       "--overlap", "16")
    chunks = [json.loads(line) for line in (tmp_path / "chunks.jsonl").read_text().splitlines()]
    assert code == 0 and len(chunks) >= 4 and chunks[-1] == {"text": "short doc", "_source": f"{path}:2#0"}
    assert "packed:" in out and "padding" in out


def test_split_never_overwrites_its_input_and_writes_all_three(tmp_path, capsys):
    rows = [{"instruction": f"q{i}", "output": "a"} for i in range(20)]
    source = write_jsonl(tmp_path / "foo.train.jsonl", rows)
    (tmp_path / "foo.train.test.jsonl").write_text("stale\n")  # from an earlier split with a test share
    code, _, _ = run(capsys, "split", str(source), "--val", "0.1", "--test", "0")
    assert code == 0 and source.read_text().count("\n") == 20
    assert (tmp_path / "foo.train.test.jsonl").read_text() == ""  # rewritten, not left stale
    assert (tmp_path / "foo.train.train.jsonl").read_text().count("\n") == 18
