"""Quiet by default: a command prints tunesmith's own lines; known third-party noise is filtered
where it is emitted, and ``tunesmith -v`` shows it again.

Each filter names its source (a logger, a warning's module, a ``print``), the exact message it
drops, and why that message is noise. Anything not listed still shows: another warning from the
same library, the same logger's other messages, a print that is not a known one.

Bottom layer: the standard library only, and absl's logging module (its logger must be absl's own
class); transformers', datasets' and huggingface_hub's progress-bar switches are called only where
those are imported already.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from importlib.util import find_spec
from typing import TextIO


@dataclass(frozen=True)
class KnownLine:
    """One known third-party message: where it is emitted (a logger's name, or a module that
    calls ``print``), a regex that matches the whole message, and why it is noise."""

    source: str
    message: str
    why: str

    def matches(self, text: str) -> bool:
        return re.fullmatch(self.message, text, flags=re.DOTALL) is not None


@dataclass(frozen=True)
class KnownWarning(KnownLine):
    """A known ``warnings.warn`` message; ``source`` is the module the warning is attributed to."""

    category: type[Warning] = FutureWarning


# Records of these loggers (exactly these, not their children) whose message matches are dropped.
LOGGED: tuple[KnownLine, ...] = (
    KnownLine("bitsandbytes.backends.cpu.ops",
              r"Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'\. "
              r"Please make sure you already `pip install kernels` and the kernels >= [\d.]+",
              "on every import bitsandbytes tries an optional CPU kernel from the `kernels` package; "
              "its own CPU code runs without it"),
    KnownLine("liger_kernel.backends.registry",
              r"Backend impl 'liger_kernel\.ops\.backends\._cutedsl\.\w+' for op '\w+' could not be imported: "
              r"ImportError: cutedsl backend requires the NVIDIA CUTLASS Python DSL \(CuTe DSL\)\. .*",
              "Liger tries its optional CuTe-DSL backend (package nvidia-cutlass-dsl) before its Triton kernels, "
              "which it then uses (seen on an H200, liger-kernel 0.8.5)"),
    KnownLine("liger_kernel.backends.registry",
              r"Backend impl 'liger_kernel\.ops\.backends\._ascend\.\w+' for op '\w+' could not be imported: "
              r"ImportError: cannot import name 'tanh' from 'triton\.language\.math' \(.*\)",
              "Liger's Ascend NPU backend does not import with NVIDIA's Triton; it is for Huawei NPUs only "
              "(seen on an H200, liger-kernel 0.8.5)"),
    KnownLine("liger_kernel.transformers.monkey_patch",
              r"Applying Liger kernels to model instance with model type: \w+ with kwargs: \{.*\}",
              "tunesmith logs the kernels it switched on (fast path: Liger RMSNorm, RoPE and SwiGLU)"),
    KnownLine("mlflow.store.db.utils", r"Creating initial MLflow database tables\.\.\.",
              "the first run in a folder creates the SQLite store; tunesmith names the store itself"),
    KnownLine("mlflow.store.db.utils", r"Updating database tables",
              "MLflow's schema migration of a new SQLite store"),
    KnownLine("gguf.gguf_writer", r"gguf: This GGUF file is for (?:Little|Big) Endian only",
              "the GGUF writer's byte order, on every export; tunesmith names the file it wrote"),
    KnownLine("gguf.gguf_writer", r"Writing the following files:", "the GGUF writer's file list, one line each"),
    KnownLine("gguf.gguf_writer", r".+: n_tensors = \d+, total_size = \S+",
              "the GGUF writer's file list, one line each"),
    KnownLine("absl", r"Using default tokenizer\.",
              "rouge_score's scorer, built for every `tunesmith eval` with ROUGE, announces its tokenizer"),
    KnownLine("alembic.runtime.plugins", r"setup plugin [\w.]+",
              "Alembic names each of its own plugins as it loads them, whenever tunesmith server opens its store"),
    KnownLine("alembic.runtime.migration", r"Context impl \w+\.|Will assume (?:non-)?transactional DDL\.",
              "Alembic names its database dialect whenever the store is opened; its 'Running upgrade' lines stay"),
)

# Warnings of these categories, attributed to these modules, with these messages, are ignored.
WARNED: tuple[KnownWarning, ...] = (
    KnownWarning("transformers.modeling_utils",
                 r"`is_gradient_checkpointing` is deprecated and will be removed in v6\. Use "
                 r"`is_activation_checkpointing` instead\.",
                 "peft reads the old name whenever it wraps a model (peft 0.21, transformers 5.24)"),
    KnownWarning("transformers.modeling_utils",
                 r"`gradient_checkpointing_enable` is deprecated and will be removed in v6\. Use "
                 r"`activation_checkpointing_enable` instead\.",
                 "adapters.apply_method and peft's prepare_model_for_kbit_training call the old name"),
)

# Lines that third-party code prints to stdout or stderr (compared without their colour codes);
# dropped inside ``known_prints_dropped()``, which tracking wraps around starting and ending trackers.
PRINTED: tuple[KnownLine, ...] = (
    KnownLine("trackio.run", r"\* Run finished\. Uploading logs to Trackio \(please wait\.\.\.\)",
              "a local trackio run writes to its SQLite file; nothing is uploaded"),
    KnownLine("trackio", r"\* Trackio project initialized: .*", "tunesmith's config names the project"),
    KnownLine("trackio", r"\* Trackio metrics logged to: .*", "trackio's own data folder, announced per run"),
    KnownLine("trackio", r"\* View dashboard by running in your terminal:", "an advert for `trackio show`"),
    KnownLine("trackio", r"trackio show --project .*", "an advert for `trackio show`"),
    KnownLine("trackio", r"\* or by running in Python: trackio\.show\(.*\)", "an advert for `trackio show`"),
    KnownLine("trackio", r"\* psutil detected, enabling automatic CPU/system metrics logging",
              "trackio's system metrics, announced per run"),
    KnownLine("trackio", r"\* (?:Created new|Resumed existing) run: .*", "trackio's run name, announced per run"),
    KnownLine("wandb.sdk.wandb_run", r"wandb: W&B syncing is set to `offline` in this directory\. Run `wandb online` "
              r"or set WANDB_MODE=online to enable cloud syncing\.",
              "tunesmith logs that the run is offline, where it is, and that `wandb sync` uploads it"),
    KnownLine("wandb.sdk.wandb_run", r"wandb: Run data is saved locally in .*", "tunesmith logs where the run is"),
    KnownLine("wandb.sdk.wandb_run", r"wandb: View this run in the terminal with `wandb leet`",
              "an advert for `wandb leet`"),
)

# Third-party verbosity switches, set (where the user has not set them) unless verbose. The
# loading and download bars (transformers' "Loading weights", huggingface_hub's files, datasets'
# map and split bars) repeat what tunesmith's own log lines say, and carriage returns garble a
# log. W&B's quiet mode drops its "Tracking run with wandb version ..." and its footer (run
# history and summary sparklines, "You can sync this run ..."), keeping its warnings and errors;
# tunesmith logs where an offline run is and how to sync it (the offline header is in PRINTED).
ENVIRONMENT: dict[str, str] = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                               "WANDB_QUIET": "true"}

# Loggers whose INFO lines (every request, every lock) are noise; their warnings still show.
CHATTY_LOGGERS = ("httpx", "urllib3", "datasets", "filelock")

_verbose = False
_undo: list[Callable[[], None]] = []  # what the last install() did, undone by the next


class _KnownLinesFilter(logging.Filter):
    """Drops a logger's records whose message is one of ``lines``."""

    def __init__(self, lines: list[KnownLine]):
        super().__init__()
        self.lines = lines

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(line.matches(message) for line in self.lines)


def install(verbose: bool = False) -> None:
    """Filter the known third-party lines; with ``verbose``, filter nothing. The CLI calls it first,
    before anything third-party is imported; a second call replaces what the first installed."""
    global _verbose
    uninstall()
    _verbose = verbose
    if verbose:
        return
    for source in dict.fromkeys(line.source for line in LOGGED):
        logger = _source_logger(source)
        if logger is None:
            continue
        known = _KnownLinesFilter([line for line in LOGGED if line.source == source])
        logger.addFilter(known)
        _undo.append(lambda logger=logger, known=known: logger.removeFilter(known))
    for known in WARNED:
        warnings.filterwarnings("ignore", message=known.message + r"\Z", category=known.category,
                                module=re.escape(known.source) + "$")
        entry = warnings.filters[0]
        _undo.append(lambda entry=entry: entry in warnings.filters and warnings.filters.remove(entry))
    for name in CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        _undo.append(lambda logger=logger, level=logger.level: logger.setLevel(level))
        logger.setLevel(logging.WARNING)
    for name, value in ENVIRONMENT.items():
        if name not in os.environ:
            os.environ[name] = value
            _undo.append(lambda name=name: os.environ.pop(name, None))
    _progress_bars_off_where_imported()


def _source_logger(name: str) -> logging.Logger | None:
    """The logger ``name``. absl's comes from absl itself, where installed: its logger has its own
    class, and one made here first would be a plain ``logging.Logger`` that absl then uses."""
    if name != "absl":
        return logging.getLogger(name)
    if find_spec("absl") is None:
        return None
    from absl import logging as absl_logging

    return absl_logging.get_absl_logger()


def uninstall() -> None:
    """Undo what ``install`` did: every third-party line shows; known prints are still dropped
    (the default, also where tunesmith is used as a library)."""
    global _verbose
    _verbose = False
    while _undo:
        _undo.pop()()


def _progress_bars_off_where_imported() -> None:
    """The environment switches are read at import: a library imported before ``install`` (a
    test calling the CLI in-process) is switched directly, and back by the next install."""
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import utils as hub

        if not hub.are_progress_bars_disabled():
            hub.disable_progress_bars()
            _undo.append(hub.enable_progress_bars)
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        if transformers_logging.is_progress_bar_enabled():
            transformers_logging.disable_progress_bar()
            _undo.append(transformers_logging.enable_progress_bar)
    if "datasets" in sys.modules:
        from datasets import utils as datasets_utils

        if not datasets_utils.are_progress_bars_disabled():
            datasets_utils.disable_progress_bars()
            _undo.append(datasets_utils.enable_progress_bars)


_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def _known_print(line: str) -> bool:
    plain = _COLOUR.sub("", line)
    return any(known.matches(plain) for known in PRINTED)


class _DroppingWriter:
    """A stream that passes every line through except the known prints (whole lines only)."""

    def __init__(self, stream: TextIO):
        self.stream, self.pending = stream, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            if not _known_print(line):
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def close_line(self) -> None:
        if self.pending and not _known_print(self.pending):
            self.stream.write(self.pending)
        self.pending = ""

    def __getattr__(self, name: str):  # encoding, isatty, fileno...: the real stream's
        return getattr(self.stream, name)


@contextmanager
def known_prints_dropped() -> Iterator[None]:
    """Inside, the known third-party prints (``PRINTED``: trackio's and W&B's announcements) are
    dropped from stdout and stderr, unless ``install(verbose=True)``; every other line passes."""
    if _verbose:
        yield
        return
    out, err = _DroppingWriter(sys.stdout), _DroppingWriter(sys.stderr)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            yield
    finally:
        out.close_line()
        err.close_line()
