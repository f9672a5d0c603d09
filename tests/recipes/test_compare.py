"""`tunesmith methods compare`: same data, budget and seed; a table, a JSON and an HTML report."""

import json

import pytest
import yaml

from tunesmith.cli.main import main
from tunesmith.errors import ConfigError
from tunesmith.compare import load_compare_config
from helpers import tiny_tree


def write_compare(tmp_path, tiny_model_dir, chat_file, methods):
    base = tiny_tree(tiny_model_dir, chat_file, tmp_path / "unused", "lora", max_steps=3)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "output": "out", "max_steps": 4,
                                                           "methods": methods}))
    return tmp_path / "compare.yaml"


def test_compare_trains_each_method_and_reports(tiny_model_dir, chat_file, tmp_path, capsys):
    path = write_compare(tmp_path, tiny_model_dir, chat_file, [
        {"name": "lora", "overrides": {"method.type": "lora"}},
        {"name": "prompt", "overrides": {"method.type": "prompt", "training.lr": 0.1}},
        {"name": "full", "overrides": {"method.type": "full", "training.lr": 1e-3}}])
    assert main(["methods", "compare", str(path)]) == 0
    printed = capsys.readouterr().out
    results = {r["name"]: r for r in json.loads((tmp_path / "out" / "compare.json").read_text())}
    assert list(results) == ["lora", "prompt", "full"]
    assert results["full"]["trainable_percent"] == 100.0
    assert 0 < results["prompt"]["trainable_parameters"] < results["lora"]["trainable_parameters"]
    assert results["full"]["size_on_disk_mb"] > 10 * results["lora"]["size_on_disk_mb"] > 0
    assert all(r["peak_memory_mb"] > 100 and r["tokens_per_s"] > 0 for r in results.values())
    for name in results:  # the same budget: every run made exactly max_steps steps
        assert json.loads((tmp_path / "out" / name / "summary.json").read_text())["steps"] == 4
    assert "131,072 parameters instead of 16,777,216 (99.2% fewer)" in printed
    assert "this model's q_proj (64 x 64) at r=8: LoRA trains r x (in + out) = 1,024 parameters instead of 4,096" \
        in printed
    page = (tmp_path / "out" / "compare.html").read_text()
    assert page.count("<svg") == 6 and "polyline" in page


def test_compare_refuses_an_unfair_override(tiny_model_dir, chat_file, tmp_path):
    path = write_compare(tmp_path, tiny_model_dir, chat_file, [
        {"name": "lora", "overrides": {"method.type": "lora", "training.max_steps": 100}}])
    with pytest.raises(ConfigError, match=r"methods\[0\] \(lora\): training.max_steps would change"):
        load_compare_config(path)
