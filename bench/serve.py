"""A bounded load test of `tunesmith serve` on loopback: requests/s, latency, time to first token.

    python bench/serve.py [--target embedded] [--requests 200] [--concurrency 8] [--max-tokens 16]

Starts the server in this process on 127.0.0.1 (a free port), sends a fixed number of streamed
chat requests from `--concurrency` client threads, and prints requests/s, p50/p99 latency,
p50/p99 time to first token, and the status codes seen (any 5xx is a failure). Traffic never
leaves this machine; the run stops after the requests, or after --timeout seconds.
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

import uvicorn

from tunesmith.serve.app import create_app
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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="embedded")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    served = build_served(args.target, {}, "cpu", args.max_tokens)
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
