"""Errors that reach the user. Each carries a message naming what is wrong and the fix."""

from __future__ import annotations


class TunesmithError(Exception):
    """Base class: the CLI prints the message (no traceback) and exits non-zero."""


class ConfigError(TunesmithError):
    """The config is invalid. ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        head = f"{source}: " if source else ""
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"{head}invalid config ({count}):\n" + "\n".join(f"  - {p}" for p in problems))


class DataError(TunesmithError):
    """The dataset is invalid. ``problems`` holds one ``file:line: field: message`` line each."""

    def __init__(self, problems: list[str], warnings: list[str] | None = None,
                 consequence: str = "nothing was trained", hint: str | None = None):
        self.problems = problems
        self.warnings = warnings or []
        count = f"{len(problems)} error{'s' if len(problems) != 1 else ''}"
        lines = [f"  {p}" for p in problems]
        if self.warnings:
            lines.append(f"and {len(self.warnings)} warning(s):")
            lines += [f"  {w}" for w in self.warnings]
        if hint:
            lines.append(hint)
        super().__init__(f"dataset rejected ({count}); {consequence}:\n" + "\n".join(lines))


class ModelLoadError(TunesmithError):
    """A model could not be found or loaded."""


class RunStopped(TunesmithError):
    """Training ended before its end with the run folder in a known state: ``status`` is what the run
    folder says (``preempted`` or ``diverged``), ``exit_code`` what the CLI exits with (143 after
    SIGTERM/SIGUSR1, 130 after Ctrl-C, 1 for a diverged run)."""

    def __init__(self, message: str, status: str, exit_code: int, step: int | None = None):
        super().__init__(message)
        self.status, self.exit_code, self.step = status, exit_code, step
