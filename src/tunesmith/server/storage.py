"""The storage root: the one place the server reads and writes files.

::

    ROOT/
      store.db            the job store (SQLite, unless --db names another database)
      files/FILE_ID.jsonl uploaded files
      jobs/JOB_ID/        config.yaml (what the job trains with) and train.log (its output)
      runs/JOB_ID/        the job's run folder (tunesmith train's layout, rundir.py)
      tmp/                uploads being received (what a crash left, removed at the next start)
      cache/              the training processes' compile caches and temporary files

Every path is made here from ids the server generated (``store.new_id``) and checked against a
pattern; nothing a client sends (a file name, an id from a URL) becomes a path without passing
``_inside``, so no request can read or write outside the root.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.rundir import RunDir

FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
JOB_ID = re.compile(r"^ftjob-[0-9a-f]{24}$")


class Storage:
    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser().resolve()
        for folder in ("files", "jobs", "runs", "tmp", "cache"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)

    def clear_uploads(self, older_than_s: float = 3600.0) -> None:
        """Remove from tmp/ what uploads cut short by a crash left there: what has not been written to for
        ``older_than_s`` (another server sharing the root may be receiving an upload right now)."""
        cutoff = time.time() - older_than_s
        for leftover in (self.root / "tmp").iterdir():
            newest = max([leftover.stat().st_mtime] + [p.stat().st_mtime for p in leftover.rglob("*")])
            if newest < cutoff:
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.root / 'store.db'}"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def file_path(self, file_id: str) -> Path:
        return self._inside(self.root / "files" / f"{_checked(file_id, FILE_ID)}.jsonl")

    def job_dir(self, job_id: str) -> Path:
        return self._inside(self.root / "jobs" / _checked(job_id, JOB_ID))

    def job_config(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "config.yaml"

    def job_log(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "train.log"

    def run(self, job_id: str) -> RunDir:
        return RunDir(self._inside(self.runs_dir / _checked(job_id, JOB_ID)))

    def receiving(self) -> Path:
        """A new folder in tmp/ for one upload's parts (deleted when the request ends; ``keep`` moves the
        file out of it first)."""
        return Path(tempfile.mkdtemp(dir=self.root / "tmp", prefix="upload-"))

    def child_environment(self) -> dict[str, str]:
        """What a job's training process writes besides its run folder goes under the root too: compile
        caches (training.compile, triton kernels) and temporary files."""
        cache = self.root / "cache"
        (cache / "tmp").mkdir(parents=True, exist_ok=True)
        return {"TORCHINDUCTOR_CACHE_DIR": str(cache / "torchinductor"), "TRITON_CACHE_DIR": str(cache / "triton"),
                "TMPDIR": str(cache / "tmp")}

    def scrub(self, text: str) -> str:
        """``text`` with the storage root's path taken out (a key is not told where the server keeps things)."""
        return text.replace(f"{self.root}/", "").replace(str(self.root), ".")

    def keep(self, received: Path, file_id: str) -> Path:
        target = self.file_path(file_id)
        os.replace(self._inside(received), target)
        return target

    def delete_file(self, file_id: str) -> None:
        self.file_path(file_id).unlink(missing_ok=True)

    def delete_job(self, job_id: str) -> None:
        for folder in (self.job_dir(job_id), self.run(job_id).path):
            shutil.rmtree(folder, ignore_errors=True)

    def _inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise TunesmithError(f"refused: {path} is outside the storage root {self.root}")
        return resolved


def _checked(ident: str, pattern: re.Pattern[str]) -> str:
    if not pattern.fullmatch(ident):
        raise TunesmithError(f"refused: {ident!r} is not an id this server made")
    return ident
