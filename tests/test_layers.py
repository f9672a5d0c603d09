"""The layers of DESIGN.md, as import-linter contracts in pyproject.toml ([tool.importlinter]).

A forbidden import fails the suite: the second test plants one (recipes.dpo importing recipes.sft)
in a copy of the package and checks that the contracts break and name it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def lint_imports(config: Path, source: Path) -> subprocess.CompletedProcess:
    """lint-imports over the ``tunesmith`` package found in ``source``, with the contracts of ``config``."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    script = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", script, "--config", str(config), "--no-cache"], cwd=source,
                          env=env, capture_output=True, text=True, timeout=300)


def test_the_layer_contracts_hold():
    result = lint_imports(REPO / "pyproject.toml", REPO / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


def test_a_recipe_importing_another_recipe_breaks_the_contracts(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(REPO / "src" / "tunesmith", source / "tunesmith",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    planted = source / "tunesmith" / "recipes" / "dpo.py"
    planted.write_text(planted.read_text() + "\nfrom tunesmith.recipes.sft import SFTObjective  # planted\n")
    result = lint_imports(REPO / "pyproject.toml", source)
    assert result.returncode != 0, result.stdout
    assert "recipes are leaves" in result.stdout and "BROKEN" in result.stdout
    assert "tunesmith.recipes.dpo -> tunesmith.recipes.sft" in result.stdout
