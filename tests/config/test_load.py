from pathlib import Path

import pytest
import yaml

from tunesmith.config.load import build_config, load_config
from tunesmith.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_every_shipped_config_validates():
    configs = sorted((REPO / "configs").rglob("*.yaml")) + sorted((REPO / "configs").rglob("*.yml"))
    assert configs, "no configs found under configs/"
    for path in configs:
        tree = yaml.safe_load(path.read_text())
        if "methods" in tree:  # a `tunesmith methods compare` file
            from tunesmith.compare import load_compare_config

            compare, per_method = load_compare_config(path)
            assert list(per_method) == [m.name for m in compare.methods]
            continue
        if "params" in tree:  # a `tunesmith sweep` file (tests/config/test_example_configs.py validates them)
            continue
        config = load_config(path)
        for dataset in config.data.train:
            assert Path(dataset.path).is_file(), f"{path}: {dataset.path}"


def test_all_errors_at_once_with_field_value_and_fix(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    with pytest.raises(ConfigError) as caught:
        build_config({"data": {"train": str(data)}, "training": {"lrr": 1e-4, "lr": -1, "scheduler": "cos"},
                      "method": {"type": "lora", "lora": {"r": 0}}, "modle": {}})
    problems = caught.value.problems
    assert len(problems) == 5, problems
    text = "\n".join(problems)
    assert "training.lrr: unknown field" in text and "did you mean 'training.lr'?" in text
    assert "training.lr: -1 is invalid: Input should be greater than 0" in text
    assert "training.scheduler: 'cos' is invalid" in text and "'linear', 'cosine' or 'constant'" in text
    assert "method.lora.r: 0 is invalid" in text
    assert "modle: unknown field" in text and "did you mean 'model'?" in text


def test_cross_field_and_missing_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="warmup_steps or training.warmup_ratio, not both"):
        build_config({"data": {"train": "x.jsonl"}, "training": {"warmup_steps": 1, "warmup_ratio": 0.1}})
    with pytest.raises(ConfigError, match=r"data.train\[0\].path: 'missing.jsonl' does not exist"):
        build_config({"data": {"train": "missing.jsonl"}})
    with pytest.raises(ConfigError, match="data: required field is missing"):
        build_config({})


def test_overrides_and_paths_relative_to_the_config(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.jsonl").write_text("{}\n")
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "c.yaml").write_text(yaml.safe_dump({"name": "x", "data": {"train": "../data/t.jsonl"}}))
    config = load_config(cfg / "c.yaml", ["training.lr=1e-4", "method.lora.r=8",
                                          "method.lora.target_modules=[q_proj, v_proj]"])
    assert config.training.lr == 1e-4 and config.method.lora.r == 8
    assert config.method.lora.target_modules == ["q_proj", "v_proj"]
    assert Path(config.data.train[0].path) == (tmp_path / "data" / "t.jsonl").resolve()


def test_yaml_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata:\n  train: [a\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(bad)


def test_one_dataset_as_a_mapping_and_an_inline_chat_template(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    config = build_config({"data": {"train": {"path": str(data), "format": "alpaca"}},
                           "model": {"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}" * 20}})
    assert config.data.train[0].format == "alpaca" and config.model.chat_template.startswith("{%")
    with pytest.raises(ConfigError, match="model.name_or_path: {'x': 1} is invalid"):
        build_config({"data": {"train": str(data)}, "model": {"name_or_path": {"x": 1}}})


def test_a_data_path_that_is_not_a_data_file_is_a_config_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"data.train\[0\].path: '.*notes.txt' is not a data file; use one of"):
        build_config({"data": {"train": str(tmp_path / "notes.txt")}})


def test_a_bare_off_switches_the_fused_lora_off():
    """YAML 1.1 reads `off` as false; the setting still means its "off" value."""
    from tunesmith.config.load import parse_override
    from tunesmith.config.schema import TrainingConfig

    keys, value = parse_override("training.fused_lora=off")
    assert value is False
    assert TrainingConfig.model_validate({keys[-1]: value}).fused_lora == "off"
