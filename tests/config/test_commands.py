"""The flags of `eval`, `export` and `serve` as typed models: a bad value is named by its flag, every
problem is reported at once, before the target is even looked up, and good flags come back typed."""

from __future__ import annotations

import argparse

import pytest

from tunesmith.cli.main import build_parser, main
from tunesmith.config.commands import (EvalCommandConfig, ExportCommandConfig, ServeCommandConfig, flag_of,
                                       validate_command)
from tunesmith.errors import ConfigError

MODELS = {"eval": EvalCommandConfig, "export": ExportCommandConfig, "serve": ServeCommandConfig}


def problems_of(argv: list[str]) -> list[str]:
    """The ConfigError lines of ``tunesmith ARGV``'s flags, validated as the command does."""
    args = build_parser().parse_args(argv)
    with pytest.raises(ConfigError) as caught:
        validate_command(MODELS[argv[0]], args, argv[0])
    assert caught.value.source == f"tunesmith {argv[0]}"
    return caught.value.problems


def subparser(command: str) -> argparse.ArgumentParser:
    actions = build_parser()._subparsers._group_actions[0]  # the subcommands
    return actions.choices[command]


@pytest.mark.parametrize("command", sorted(MODELS))
def test_one_field_per_flag(command):
    """A flag added to the parser but not to its model would go unvalidated (and the reverse would
    fail every run): their names must match."""
    dests = {a.dest for a in subparser(command)._actions if a.dest != "help"}
    assert set(MODELS[command].model_fields) == dests


@pytest.mark.parametrize("argv, flag, message", [
    (["eval", "m", "--data", "d.jsonl", "--max-new-tokens", "0"], "--max-new-tokens",
     "--max-new-tokens: 0 is invalid: Input should be greater than or equal to 1"),
    (["eval", "m", "--data", "d.jsonl", "--threshold", "0"], "--threshold",
     "--threshold: 0.0 is invalid: Input should be greater than 0"),
    (["eval", "m", "--data", "d.jsonl", "--pattern", "a(b", "--metrics", "regex_match"], "--pattern",
     "--pattern: not a valid regex: 'a(b'"),
    (["export", "r", "--out", "o", "--quant", "f16,q5_k"], "--quant", "--quant: unknown GGUF type(s) q5_k"),
    (["serve", "r", "--port", "0"], "--port", "--port: 0 is invalid: Input should be greater than or equal to 1"),
    (["serve", "r", "--adapter", "no-equals"], "--adapter", "--adapter: 'no-equals': expected NAME=RUN"),
])
def test_a_bad_value_is_named_by_its_flag(argv, flag, message):
    problems = problems_of(argv)
    assert len(problems) == 1 and problems[0].startswith(message), problems
    assert flag_of(flag.removeprefix("--").replace("-", "_")) == flag


def test_eval_reports_every_problem_at_once_with_the_rules_across_flags():
    """Planted once: with the rules across flags dropped whenever a single flag fails, this fails."""
    problems = problems_of(["eval", "m", "--limit", "0", "--bootstrap", "-1", "--metrics", "loss,bleurt",
                            "--normalize", "case,stem", "--extract", "(unclosed", "--judge-url", "http://j/v1",
                            "--fail-on-drift", "--device", "gpu"])
    text = "\n".join(problems)
    assert len(problems) == 10, text
    for line in ("--limit: 0 is invalid", "--bootstrap: -1 is invalid", "--metrics: unknown metric 'bleurt'",
                 "--normalize: unknown step(s) stem", "--extract: not a valid regex",
                 "--device: 'gpu' is invalid: must be auto, cpu, cuda, cuda:N or mps",
                 "name what to evaluate on: --data FILE", "--judge-url and --judge-model go together",
                 "the LLM judge compares two models", "--fail-on-drift needs --baseline"):
        assert line in text
    harness = problems_of(["eval", "m", "--harness", "a.jsonl", "--compare-base", "--metrics", "regex_match"])
    assert harness == ["--harness scores one model; --compare, --compare-base, --baseline and the judge are for "
                       "--data alone (run --harness on each model)", "--metrics regex_match needs --pattern"]


def test_export_and_serve_report_every_problem_at_once():
    """Planted once: with ``Count`` unconstrained, --max-concurrency and --max-tokens go missing here."""
    export = problems_of(["export", "r", "--out", "", "--quant", ","])
    assert export == ["--out: '' is invalid: String should have at least 1 character",
                      "--quant: ',' names no GGUF type; choose from f32, f16, bf16, q8_0, q4_0, comma-separated"]
    serve = problems_of(["serve", "r", "--port", "70000", "--max-tokens", "0", "--max-concurrency", "0",
                         "--adapter", "a=x", "--adapter", "a=y", "--api-key", ""])
    assert serve == ["--adapter: name 'a' given twice; give each adapter its own name",
                     "--port: 70000 is invalid: Input should be less than or equal to 65535",
                     "--api-key: '' is invalid: String should have at least 1 character",
                     "--max-concurrency: 0 is invalid: Input should be greater than or equal to 1",
                     "--max-tokens: 0 is invalid: Input should be greater than or equal to 1"]


@pytest.mark.parametrize("argv, flag", [
    (["eval", "no-such-model", "--data", "missing.jsonl", "--batch-size", "0"], "--batch-size"),
    (["export", "no-such-run", "--out", "o", "--quant", "q5_k"], "--quant"),
    (["serve", "no-such-run", "--port", "-1"], "--port"),
])
def test_the_command_checks_its_flags_before_it_looks_at_the_target(argv, flag, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: tunesmith {argv[0]}: invalid config (1 problem):\n  - {flag}: " in err, err


def test_good_flags_come_back_typed():
    flags = validate_command(EvalCommandConfig, build_parser().parse_args(
        ["eval", "m", "--harness", "a.jsonl, b.yaml", "--metrics", "loss,rouge,regex_match", "--pattern", r"^\d+$",
         "--normalize", "none", "--extract", "number", "--num-fewshot", "0", "--bootstrap", "0"]), "eval")
    assert flags.harness == ["a.jsonl", "b.yaml"] and flags.normalize == ()
    assert flags.metrics == ["loss", "rouge1", "rouge2", "rougeL", "regex_match"]
    assert flags.max_new_tokens == 256 and flags.device == "auto"  # argparse's defaults, unchanged
    export = validate_command(ExportCommandConfig, build_parser().parse_args(
        ["export", "r", "--to", "ollama", "--quant", "f32, q8_0", "--out", "o"]), "export")
    assert export.quant == ["f32", "q8_0"] and export.dtype == "fp32"
    serve = validate_command(ServeCommandConfig, build_parser().parse_args(
        ["serve", "r", "--adapter", "a=runs/a", "--adapter", "b=runs/b", "--device", "cuda:1"]), "serve")
    assert serve.adapter == {"a": "runs/a", "b": "runs/b"} and serve.port == 8000 and serve.device == "cuda:1"
