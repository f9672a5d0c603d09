"""A bounded load test of `tunesmith serve` on loopback: requests/s, latency, time to first token.

    python bench/serve.py [--target embedded] [--engine batched] [--requests 200] [--concurrency 8]
    python bench/serve.py --compare [--target embedded] [--requests 64] [--levels 1,8,32] [--max-tokens 16]
                          [--vllm-python PATH]

Starts the server in this process on 127.0.0.1 (a free port) and sends a fixed number of streamed,
greedy chat requests from `--concurrency` client threads, through HTTP as a client would; it prints
requests/s, p50/p99 latency, p50/p99 time to first token, and the status codes seen (any 5xx is a
failure). Traffic never leaves this machine; the run stops after the requests, or after --timeout.

`--compare` runs the same load at each concurrency of `--levels` against each engine in turn, in one
run: `sequential` (one completion after another, transformers' generate), `batched` (the default
engine: continuous batching with prefix caching) and, where vLLM is installed (`make vllm`, or
--vllm-python), `vllm` (its server started from its own environment, behind the same front). It prints
one Markdown table side by side and checks that sequential and batched gave the same texts (vLLM
runs in bfloat16 on CPU, so its texts may differ).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import torch
import uvicorn

from tunesmith.models.device import serving_dtype
from tunesmith.generate import vllm
from tunesmith.serve.app import Served, VLLMFront, create_app
from tunesmith.serve.load import build_for_vllm, build_served

PROMPTS = ["What is the capital of France?", "Name three fruits.", "Write one sentence about rain.",
           "What is 7 times 8?", "Say hello in Spanish.", "Give a synonym for 'happy'."]


def one_request(port: int, model: str, prompt: str, max_tokens: int) -> tuple[int, float, float, str]:
    """(status, seconds to the first content, seconds in all, the text) for one streamed chat request."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
                       "temperature": 0, "max_tokens": max_tokens})
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    first, text = None, ""
    if response.status == 200:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            choices = json.loads(line[len(b"data: "):]).get("choices") or [{}]
            content = (choices[0].get("delta") or {}).get("content")
            if content:
                first = first if first is not None else time.perf_counter() - started
                text += content
    else:
        response.read()
    connection.close()
    total = time.perf_counter() - started
    return response.status, first if first is not None else total, total, text


def prompt(index: int) -> str:
    """Request ``index``'s question, numbered: no two prompts of a run are the same, so prefix caching
    reuses what they really share (the chat template's system prompt), not whole repeated prompts."""
    return f"{PROMPTS[index % len(PROMPTS)]} (question {index})"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def start(app) -> tuple[int, uvicorn.Server]:
    port = vllm.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return port, server


def load(port: int, model: str, requests: int, concurrency: int, max_tokens: int, timeout: float) -> dict:
    """The load test's numbers and texts for one server at one concurrency."""
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(one_request, port, model, prompt(i), max_tokens) for i in range(requests)]
        results = [f.result(timeout=timeout) for f in futures]
    elapsed = time.perf_counter() - started
    ok = [r for r in results if r[0] == 200]
    return {"rate": requests / elapsed, "elapsed": elapsed, "statuses": Counter(r[0] for r in results),
            "latency": [r[2] for r in ok], "ttft": [r[1] for r in ok], "texts": [r[3] for r in results]}


def engines(args: argparse.Namespace, stack: ExitStack) -> dict[str, tuple[int, str]]:
    """Each engine's server, started: name -> (port, model name to ask for)."""
    served = build_served(args.target, {}, "cpu", args.max_tokens, args.dtype)
    model = served.names[-1]
    found: dict[str, tuple[int, str]] = {}
    for name in ("sequential", "batched"):
        port, server = start(create_app(served, max_concurrency=256, batched=name == "batched",
                                         max_batch_size=max(args.levels)))
        stack.callback(setattr, server, "should_exit", True)
        found[name] = (port, model)
    try:
        python = vllm.find_python(args.vllm_python)
    except vllm.VLLMError as err:
        print(f"vllm: not measured ({err})", file=sys.stderr)
        return found
    front, models = build_for_vllm(args.target, {}, args.max_tokens)
    dtype = [f"--dtype={args.dtype}"] if args.dtype != "auto" else []
    line = vllm.command(python, models, vllm.free_port(), max(args.levels), None, dtype, cpu=True)
    log = Path(tempfile.gettempdir()) / "tunesmith-bench-vllm.log"
    print(f"starting vLLM (log: {log}) ...", file=sys.stderr, flush=True)
    process = stack.enter_context(vllm.VLLMProcess(line, vllm.environment(cpu=True), log))
    port, server = start(create_app(front, max_concurrency=256, vllm=VLLMFront(process.url)))
    stack.callback(setattr, server, "should_exit", True)
    found["vllm"] = (port, front.names[-1])
    return found


def compare(args: argparse.Namespace) -> int:
    with ExitStack() as stack:
        servers = engines(args, stack)
        for port, model in servers.values():  # warm each engine up once
            one_request(port, model, "Hello!", args.max_tokens)
        table: dict[tuple[str, int], dict] = {}
        for level in args.levels:
            requests = max(args.requests, 2 * level)
            for name, (port, model) in servers.items():
                table[name, level] = load(port, model, requests, level, args.max_tokens, args.timeout)
                print(f"{name} at concurrency {level}: {table[name, level]['rate']:.2f} req/s", file=sys.stderr,
                      flush=True)
    names = list(servers)
    print(f"\n{args.target} on CPU ({torch.get_num_threads()} threads, dtype {args.dtype}), streamed greedy chat "
          f"requests through HTTP, max_tokens {args.max_tokens}, requests per level max({args.requests}, 2 x concurrency):\n")
    print("| concurrency | " + " | ".join(f"{n} req/s | {n} p50 / p95 s" for n in names) +
          " | batched / sequential |")
    print("|---|" + "---|---|" * len(names) + "---|")
    for level in args.levels:
        cells = []
        for name in names:
            row = table[name, level]
            cells.append(f"{row['rate']:.2f} | {percentile(row['latency'], 0.5):.2f} / "
                         f"{percentile(row['latency'], 0.95):.2f}")
        speedup = table["batched", level]["rate"] / table["sequential", level]["rate"]
        print(f"| {level} | " + " | ".join(cells) + f" | {speedup:.1f}x |")
    statuses = sum((row["statuses"] for row in table.values()), Counter())
    pairs = [(a, b) for level in args.levels
             for a, b in zip(table["sequential", level]["texts"], table["batched", level]["texts"], strict=True)]
    same = sum(a == b for a, b in pairs)
    print(f"\nstatus codes: {dict(sorted(statuses.items()))}; sequential and batched gave the same text for {same} of "
          f"{len(pairs)} requests (in float32 all; in bfloat16 a row rounds differently in a batch than alone, and a "
          "greedy choice between near-equal tokens can go the other way)")
    exact = args.dtype == "float32" or (args.dtype == "auto" and "float32" == serving_dtype("auto", torch.device("cpu")))
    return 0 if set(statuses) == {200} and (same == len(pairs) or not exact) else 1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="embedded")
    parser.add_argument("--engine", choices=["batched", "sequential"], default="batched")
    parser.add_argument("--requests", type=int, default=None, help="default: 200; with --compare, 64 per level")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--compare", action="store_true", help="sequential, batched and vLLM side by side")
    parser.add_argument("--levels", default="1,8,32", help="--compare: the concurrencies, comma-separated")
    parser.add_argument("--dtype", default="auto", help="as tunesmith serve --dtype (auto: bfloat16 on CPUs with "
                        "native bf16, as vLLM runs there)")
    parser.add_argument("--vllm-python", help="--compare: the Python that has vllm (default as tunesmith serve)")
    args = parser.parse_args()
    args.requests = args.requests or (64 if args.compare else 200)
    args.levels = [int(level) for level in args.levels.split(",")]
    if args.compare:
        return compare(args)
    served: Served = build_served(args.target, {}, "cpu", args.max_tokens, args.dtype)
    port, server = start(create_app(served, max_concurrency=args.concurrency, batched=args.engine == "batched"))
    row = load(port, served.names[-1], args.requests, args.concurrency, args.max_tokens, args.timeout)
    server.should_exit = True
    print(f"{args.target} on CPU, {args.engine} engine, {args.requests} streamed requests, concurrency "
          f"{args.concurrency}, max_tokens {args.max_tokens}: {row['rate']:.2f} requests/s over {row['elapsed']:.1f} s")
    if row["latency"]:
        print(f"latency p50 {percentile(row['latency'], 0.5):.2f} s, p99 {percentile(row['latency'], 0.99):.2f} s; "
              f"time to first token p50 {percentile(row['ttft'], 0.5):.2f} s, p99 {percentile(row['ttft'], 0.99):.2f} s "
              f"(mean {statistics.fmean(row['latency']):.2f} s)")
    print(f"status codes: {dict(sorted(row['statuses'].items()))}")
    return 1 if any(code >= 500 for code in row["statuses"]) else 0


if __name__ == "__main__":
    sys.exit(main())
