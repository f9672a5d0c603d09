"""Run one benchmark path in a forked child so that its peak memory is its own."""

from __future__ import annotations

import json
import os
from collections.abc import Callable


def run_forked(work: Callable[[], dict]) -> dict:
    """Call ``work`` in a forked child and return its result with ``peak_rss_mb``, the child's peak
    resident memory (os.wait4 reports it). The child starts with the parent's pages, so what the
    parent held at the fork counts too: keep the parent light, and say how much it held.

    The parent must not have run torch ops before forking: its OpenMP pool does not survive a fork.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: work, send the result, leave without cleanup
        os.close(read)
        try:
            payload = json.dumps(work()).encode()
        except BaseException as err:  # noqa: BLE001 - any failure must reach the parent
            payload = json.dumps({"error": repr(err)}).encode()
        with os.fdopen(write, "wb") as pipe:
            pipe.write(payload)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        result = json.loads(pipe.read() or b'{"error": "no result (the child died)"}')
    _, _, usage = os.wait4(pid, 0)
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)  # KiB on Linux
    return result
