"""Helpers of the fine-tuning server's tests (tests/server/): its flags, and waiting for a job."""

from __future__ import annotations

import time
from pathlib import Path

import openai

from tunesmith.config.commands import ServerCommandConfig

ENDED = ("succeeded", "failed", "cancelled")


def server_flags(model: Path, root: Path, **changes) -> ServerCommandConfig:
    """`tunesmith server`'s flags for an in-process server on ``model`` (a small float32 CPU setup)."""
    values = dict(model=str(model), root=str(root), db=None, host="127.0.0.1", port=8000, workers=None, ray=None,
                  max_upload_mb=1, job_defaults=None, max_batch_size=4, max_concurrency=8, max_tokens=8,
                  device="cpu", dtype="float32", request_timeout=60.0, shutdown_timeout=20.0)
    return ServerCommandConfig(**{**values, **changes})


def wait_for(client: openai.OpenAI, job_id: str, timeout: float = 180.0, until: tuple[str, ...] = ENDED):
    """The job once its status is one of ``until``; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in until:
            return job
        time.sleep(0.3)
    raise AssertionError(f"{job_id}: still {job.status} after {timeout} s")
