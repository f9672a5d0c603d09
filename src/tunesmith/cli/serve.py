"""`tunesmith serve TARGET [--adapter NAME=RUN ...] [--port 8000] [--api-key K]`"""

from __future__ import annotations

import argparse


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (chat, completions, adapters)")
    parser.add_argument("target", help="a run folder, model or adapter folder, registry:NAME@ALIAS, or 'embedded'")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=RUN",
                        help="another LoRA adapter on the same base, chosen by the request's model field")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help="require Authorization: Bearer KEY on every route but /health")
    parser.add_argument("--engine", choices=["batched", "sequential", "vllm"], default="batched",
                        help="batched: concurrent requests decode together (continuous batching, adapters mixed "
                             "per row); sequential: one completion after another, through transformers' generate; "
                             "vllm: vLLM's engine in its own process, LoRA adapters through its multi-LoRA")
    parser.add_argument("--vllm-python", metavar="PATH",
                        help="--engine vllm: the Python that has vllm (default: $TUNESMITH_VLLM_PYTHON, "
                             "./.venv-vllm from `make vllm`, or this one)")
    parser.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                        help="--engine vllm: one more argument for vLLM's server, e.g. --vllm-arg=--dtype=float32")
    parser.add_argument("--vllm-log", metavar="FILE", help="--engine vllm: where vLLM's output goes "
                        "(default: tunesmith-vllm-PORT.log in the temporary folder)")
    parser.add_argument("--max-batch-size", type=int, default=32,
                        help="completions decoded together (a request's n counts n times)")
    parser.add_argument("--prefix-cache-mb", type=int, default=256,
                        help="memory for the keys and values of recent prompts' beginnings (a system prompt, "
                             "earlier turns), reused by prompts that begin the same way; 0 turns it off")
    parser.add_argument("--max-concurrency", type=int, default=64,
                        help="requests admitted at once, decoding or waiting for room in the batch; beyond: 429")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    parser.add_argument("--max-tokens", type=int, default=256, help="when a request sets none")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                        help="auto: bfloat16 where the hardware multiplies in it natively (CUDA GPUs with bf16, "
                             "CPUs with AVX-512 BF16 or AMX), else float32")
    parser.add_argument("--request-timeout", type=float, default=300.0, metavar="SECONDS",
                        help="a request's limit, queueing included; beyond it 408 and its generation stops")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="on SIGTERM/Ctrl-C, how long in-flight requests may finish before they are cancelled "
                             "(503)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from tunesmith.config.commands import ServeCommandConfig, validate_command

    flags = validate_command(ServeCommandConfig, args, "serve")  # every flag, before anything loads
    import uvicorn

    from tunesmith.serve.app import create_app
    from tunesmith.serve.load import build_served

    if flags.engine == "vllm":
        return _run_vllm(flags)
    served = build_served(flags.target, flags.adapter, flags.device, flags.max_tokens, flags.dtype)
    app = create_app(served, flags.api_key, flags.max_concurrency, flags.max_body_bytes, flags.request_timeout,
                     flags.shutdown_timeout, flags.max_batch_size, batched=flags.engine == "batched",
                     prefix_cache_bytes=flags.prefix_cache_mb << 20)
    print(f"serving {', '.join(served.names)} on http://{flags.host}:{flags.port}/v1", flush=True)
    uvicorn.run(app, host=flags.host, port=flags.port, log_level="warning",
                timeout_graceful_shutdown=flags.shutdown_timeout)
    return 0


def _run_vllm(flags) -> int:
    """vLLM's server started from its own environment, this server in front of it, both stopped together."""
    import tempfile
    from pathlib import Path

    import torch
    import uvicorn

    from tunesmith.generate import vllm
    from tunesmith.serve import tools
    from tunesmith.serve.app import VLLMFront, create_app
    from tunesmith.serve.load import build_for_vllm

    served, models = build_for_vllm(flags.target, flags.adapter, flags.max_tokens)
    python = vllm.find_python(flags.vllm_python)
    syntax = tools.call_syntax(served.tokenizer)
    parser = vllm.tool_parser(syntax.before_name, syntax.after_name) if syntax is not None else None
    cpu = flags.device == "cpu" or not torch.cuda.is_available()
    port = vllm.free_port()
    dtype = [f"--dtype={flags.dtype}"] if flags.dtype != "auto" else []
    line = vllm.command(python, models, port, flags.max_batch_size, parser, dtype + flags.vllm_arg, cpu)
    log_path = Path(flags.vllm_log or Path(tempfile.gettempdir()) / f"tunesmith-vllm-{flags.port}.log")
    print(f"starting vLLM ({python}) for {', '.join(served.names)}; its log: {log_path}", flush=True)
    with vllm.VLLMProcess(line, vllm.environment(cpu), log_path) as process:
        app = create_app(served, flags.api_key, flags.max_concurrency, flags.max_body_bytes, flags.request_timeout,
                         flags.shutdown_timeout, flags.max_batch_size, vllm=VLLMFront(process.url, parser is not None))
        print(f"serving {', '.join(served.names)} through vLLM on http://{flags.host}:{flags.port}/v1", flush=True)
        uvicorn.run(app, host=flags.host, port=flags.port, log_level="warning",
                    timeout_graceful_shutdown=flags.shutdown_timeout)
    return 0
