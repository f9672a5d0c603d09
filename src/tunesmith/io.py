"""Atomic writes: a reader sees the old file or folder, or the whole new one, never half of one."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from tunesmith.errors import TunesmithError


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600; give what a plain open() would
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable (a file cut short by a kill)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def sha256_of(path: Path) -> str:
    """The file's SHA-256, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; on success it becomes ``target``.

    An existing ``target`` is moved aside first and deleted only once the new folder is in place.
    If the body raises (or the process dies), ``target`` is untouched and the staging folder,
    named ``.tmp-<name>-*``, is removed (or left for the next writer to clean up).

    >>> import tempfile; root = Path(tempfile.mkdtemp())
    >>> with atomic_directory(root / "out") as staging:
    ...     _ = (staging / "a.txt").write_text("x")
    >>> sorted(p.name for p in root.iterdir()), (root / "out" / "a.txt").read_text()
    (['out'], 'x')
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield staging
        staging.chmod(0o777 & ~_umask())
        aside = None
        if target.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
            os.replace(target, aside / target.name)
        os.replace(staging, target)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def writing(path: Path, what: str, after: str = "") -> Iterator[None]:
    """Turn a failed write (a full disk, a read-only folder, a missing mount) into one line that names
    the path, what was being written and the cause; ``after`` says what is still intact and what to do."""
    try:
        yield
    except RuntimeError as err:
        if not _torch_write_error(err):
            raise
        # torch's zip writer reports a full disk as "[enforce fail at inline_container.cc] unexpected pos"
        full = _free_bytes(path) < (1 << 20)
        cause = "No space left on device" if full else f"torch could not write it: {str(err).splitlines()[0]}"
        raise TunesmithError(f"{path}: cannot write {what} ({cause}){'; ' + after if after else ''}") from None
    except (OSError, SafetensorError) as err:
        cause = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        # safetensors wraps the OS error in its own text: 'I/O error: No space left on device (os error 28)'
        # or 'IoError(Os { code: 28, ..., message: "No space left on device" })'
        found = re.search(r'message: "([^"]+)"|I/O error: (.+?) \(os error', cause)
        cause = next(group for group in found.groups() if group) if found else cause
        raise TunesmithError(f"{path}: cannot write {what} ({cause}){'; ' + after if after else ''}") from None


def _torch_write_error(err: RuntimeError) -> bool:
    text = str(err)
    return "inline_container" in text or "PytorchStreamWriter" in text or "unexpected pos" in text


def _free_bytes(path: Path) -> int:
    for folder in [Path(path), *Path(path).parents]:
        if folder.exists():
            return shutil.disk_usage(folder).free
    return 0


def die_with_parent() -> None:
    """For ``subprocess.Popen(preexec_fn=...)``: the child gets SIGTERM when this process dies (killed, or
    its terminal closed), instead of running on without anyone to report to (Linux; elsewhere nothing)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass
