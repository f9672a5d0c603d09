"""A bounded load test of `tunesmith serve` on loopback: requests/s, latency, time to first token.

    python bench/serve.py [--target embedded] [--requests 200] [--concurrency 8] [--max-tokens 16]
    python bench/serve.py --compare [--target embedded] [--requests 64] [--levels 1,8,32] [--max-tokens 16]

Starts the server in this process on 127.0.0.1 (a free port), sends a fixed number of streamed
chat requests from `--concurrency` client threads, and prints requests/s, p50/p99 latency,
p50/p99 time to first token, and the status codes seen (any 5xx is a failure). Traffic never
leaves this machine; the run stops after the requests, or after --timeout seconds.

`--compare` measures the generation behind the server without HTTP, in one run: sequential
generation (`generate_ids` behind one lock, as the server does today) against the batching engine
(`tunesmith.serve.engine`), at each concurrency of `--levels`, with the same greedy chat requests
from as many client threads; it prints a Markdown table of requests/s and p50/p95 latency side by
side (each level sends `--requests` requests, at least twice the concurrency) and checks that both
give the same texts.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import torch
import uvicorn

from tunesmith.data.tokenize import encode_prompt
from tunesmith.generate.sample import SamplingConfig
from tunesmith.serve.app import Served, create_app
from tunesmith.serve.engine import Engine, SequentialEngine
from tunesmith.serve.load import build_served

PROMPTS = ["What is the capital of France?", "Name three fruits.", "Write one sentence about rain.",
           "What is 7 times 8?", "Say hello in Spanish.", "Give a synonym for 'happy'."]


def one_request(port: int, model: str, prompt: str, max_tokens: int) -> tuple[int, float, float]:
    """(status, seconds to the first content, seconds in all) for one streamed chat request."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
                       "temperature": 0, "max_tokens": max_tokens})
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    first = None
    if response.status == 200:
        for line in response:
            if first is None and line.startswith(b"data: {") and b'"content": "' in line \
                    and b'"content": ""' not in line:
                first = time.perf_counter() - started
    else:
        response.read()
    connection.close()
    total = time.perf_counter() - started
    return response.status, first if first is not None else total, total


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def measure(generate, prompts: list, requests: int, concurrency: int) -> tuple[float, float, list[float], list[str]]:
    """(requests/s, CPU seconds per request, each request's seconds, each request's text) for
    ``requests`` calls of ``generate(prompt_ids)`` from ``concurrency`` client threads. CPU seconds
    (this process's) tell the two ways apart even where other jobs share the cores."""

    def timed(index: int) -> tuple[float, str]:
        started = time.perf_counter()
        text = generate(prompts[index % len(prompts)])
        return time.perf_counter() - started, text

    started, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(timed, range(requests)))
    rate, cpu_each = requests / (time.perf_counter() - started), (time.process_time() - cpu) / requests
    return rate, cpu_each, [t for t, _ in results], [text for _, text in results]


def compare(served: Served, args: argparse.Namespace) -> int:
    """Sequential (today's lock) against the batching engine, at each concurrency, in one table."""
    levels = [int(level) for level in args.levels.split(",")]
    name = served.names[-1]
    prompts = [encode_prompt(served.tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    sampling = SamplingConfig(args.max_tokens)  # greedy, like the load test's requests
    one_by_one = SequentialEngine(served.model, served.tokenizer, max_batch_size=max(levels))
    engine = Engine(served.model, served.tokenizer, max_batch_size=max(levels))

    def sequential(prompt_ids) -> str:
        return one_by_one.submit(prompt_ids, sampling, adapter=served.adapters.get(name)).result()[0].text

    def batched(prompt_ids) -> str:
        return engine.submit(prompt_ids, sampling, adapter=served.adapters.get(name)).result()[0].text

    rows, same = [], True
    try:
        for generate in (sequential, batched):  # warm both paths up once
            generate(prompts[0])
        for level in levels:
            requests = max(args.requests, 2 * level)
            seq_rate, seq_cpu, seq_times, seq_texts = measure(sequential, prompts, requests, level)
            bat_rate, bat_cpu, bat_times, bat_texts = measure(batched, prompts, requests, level)
            same = same and seq_texts == bat_texts
            rows.append(f"| {level} | {requests} | {seq_rate:.2f} | {percentile(seq_times, 0.5):.2f} / "
                        f"{percentile(seq_times, 0.95):.2f} | {seq_cpu:.2f} | {bat_rate:.2f} | "
                        f"{percentile(bat_times, 0.5):.2f} / {percentile(bat_times, 0.95):.2f} | {bat_cpu:.2f} | "
                        f"{bat_rate / seq_rate:.1f}x |")
            print(f"concurrency {level} done", file=sys.stderr, flush=True)
    finally:
        engine.close()
        one_by_one.close()
    print(f"\n{args.target} ({name}) on CPU ({torch.get_num_threads()} threads), greedy chat requests, "
          f"max_tokens {args.max_tokens}:\n")
    print("| concurrency | requests | sequential req/s | sequential p50 / p95 s | sequential CPU s/req "
          "| batched req/s | batched p50 / p95 s | batched CPU s/req | speed-up (req/s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nsame texts from both: {same}")
    return 0 if same else 1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="embedded")
    parser.add_argument("--requests", type=int, default=None, help="default: 200; with --compare, 64 per level")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--compare", action="store_true", help="sequential against batched generation")
    parser.add_argument("--levels", default="1,8,32", help="--compare: the concurrencies, comma-separated")
    args = parser.parse_args()
    args.requests = args.requests or (64 if args.compare else 200)
    served = build_served(args.target, {}, "cpu", args.max_tokens)
    if args.compare:
        return compare(served, args)
    app = create_app(served, max_concurrency=args.concurrency)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    model = served.names[-1]
    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        futures = [pool.submit(one_request, port, model, PROMPTS[i % len(PROMPTS)], args.max_tokens)
                   for i in range(args.requests)]
        results = [f.result(timeout=args.timeout) for f in futures]
    elapsed = time.perf_counter() - started
    server.should_exit = True
    statuses = Counter(status for status, _, _ in results)
    ok = [(first, total) for status, first, total in results if status == 200]
    print(f"{args.target} on CPU, {args.requests} streamed requests, concurrency {args.concurrency}, "
          f"max_tokens {args.max_tokens}: {args.requests / elapsed:.2f} requests/s over {elapsed:.1f} s")
    if ok:
        latency = [t for _, t in ok]
        ttft = [f for f, _ in ok]
        print(f"latency p50 {percentile(latency, 0.5):.2f} s, p99 {percentile(latency, 0.99):.2f} s; "
              f"time to first token p50 {percentile(ttft, 0.5):.2f} s, p99 {percentile(ttft, 0.99):.2f} s "
              f"(mean {statistics.fmean(latency):.2f} s)")
    print(f"status codes: {dict(sorted(statuses.items()))}")
    return 1 if any(code >= 500 for code in statuses) else 0


if __name__ == "__main__":
    sys.exit(main())
