"""Crash-safe file writes: a reader sees the old file or the new one, never half of either.

Every file a run or sweep writes goes through here: whole files are written to a temporary file
in the same folder, fsynced and renamed over the target (rename is atomic on POSIX); the metrics
log is appended a line at a time and read back tolerating a torn last line. An error while writing names
the file it was writing, so the user learns where a disk filled up; a checkpoint is refused before it is
written when its filesystem would be left with less than :data:`RESERVE` free.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


TEMP_SUFFIX = ".tmp"  # a whole-file write in progress: ".<name>.<random>.tmp" beside its target
# What a checkpoint leaves free on its filesystem: room for the small files that follow it (a metrics row,
# result.json, results.csv), so that a disk about to fill up stops a sweep cleanly instead of mid-write.
RESERVE = 1 << 20


@contextlib.contextmanager
def _atomic(path: Path, mode: str) -> Iterator[Any]:
    path = Path(path)
    # The folder is not made here: one that vanished (deleted, unmounted) is an error to report, and making it
    # again would write where the user no longer looks, or onto the disk under a mount point.
    with _naming(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with _naming(path), os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        with _naming(path):
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An OSError raised without a file name (a write into a full disk) names ``path``."""
    try:
        yield
    except OSError as err:
        if not err.filename:
            err.filename = str(path)
        raise


def check_space(path: Path, size: int) -> None:
    """Raise ENOSPC, before anything is written, when writing ``size`` bytes to ``path`` would leave its
    filesystem less than :data:`RESERVE` free. A filesystem that cannot say is trusted."""
    try:
        stat = os.statvfs(path.parent)
    except (OSError, AttributeError):
        return
    free = stat.f_bavail * stat.f_frsize
    if free < size + RESERVE:
        raise OSError(errno.ENOSPC, f"not enough free space for {path.name} ({_mb(size)} MB) and a margin of "
                                    f"{_mb(RESERVE)} MB: {_mb(free)} MB free", str(path))


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f}"


def remove_stale_temps(folder: Path, older_than_s: float = 0.0) -> int:
    """Delete the temporary files of whole-file writes that never finished in ``folder`` (their writer was
    killed), those older than ``older_than_s``; the caller knows no writer of that age is still at work.
    Returns how many were deleted."""
    removed = 0
    cutoff = time.time() - older_than_s
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX) and entry.is_file():
                with contextlib.suppress(OSError):
                    if entry.stat().st_mtime <= cutoff:
                        os.unlink(entry.path)
                        removed += 1
    return removed


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; some filesystems refuse, which only weakens durability.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: Path, text: str) -> None:
    with _atomic(path, "w") as handle:
        handle.write(text)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_torch(path: Path, obj: Any) -> None:
    # torch is imported here, not at the top: reading a runs/ folder (layout, results, report) must not
    # pay for it. Serialise into memory first so a failure while pickling leaves no partial temp file.
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    check_space(path, buffer.getbuffer().nbytes)
    with _atomic(path, "wb") as handle:
        handle.write(buffer.getbuffer())


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with _naming(path), open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a torn or corrupt line (a crash mid-append) ends the read there."""
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(row, dict):
            break
        rows.append(row)
    return rows


def read_json(path: Path) -> Any | None:
    """A JSON file's content, or None when it is missing or does not parse."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
