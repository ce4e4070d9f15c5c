"""Faults of the machine, not of the run: a full disk, an exceeded quota, a read-only filesystem, a folder
that vanished (deleted, unmounted, or a stale NFS handle).

A run that meets one is not broken and must not be recorded as failed: every file is written whole or not
at all (:mod:`depthbench.storage`), so its last checkpoint stays valid. The run is interrupted, the sweep
stops starting runs, and a plain re-run resumes it once the condition is fixed. No torch.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from depthbench import storage

# errno -> (the condition in words, what the user does about it)
CONDITIONS = {
    errno.ENOSPC: ("no space left on device", "free space there"),
    errno.EDQUOT: ("disk quota exceeded", "free space there or raise the quota"),
    errno.EROFS: ("read-only file system", "make the filesystem writable again"),
    errno.ESTALE: ("folder vanished (stale file handle)", "mount the folder again"),
}
VANISHED = ("folder vanished", "restore the folder (or mount it again)")
EXIT_CODE = 75  # sysexits' EX_TEMPFAIL: a temporary failure, to be tried again once fixed


@dataclass(frozen=True)
class MachineFault:
    """What stopped a run: the condition in words, where it was met, and what fixes it."""

    condition: str
    path: str
    fix: str

    def __str__(self) -> str:
        return f"{self.condition} ({self.path})"


def machine_fault(err: BaseException, folder: Path) -> MachineFault | None:
    """The machine fault behind ``err`` (or an exception it was raised from), or None when the run itself
    failed. ``folder`` is where the run writes: a missing file counts only when that folder has vanished."""
    for cause in _chain(err):
        if not isinstance(cause, OSError):
            continue
        path = Path(cause.filename) if cause.filename else folder
        if cause.errno in CONDITIONS:
            condition, fix = CONDITIONS[cause.errno]
            # A refusal before writing (check_space) says why in its own words.
            if cause.strerror and cause.strerror != os.strerror(cause.errno):
                condition = cause.strerror
            return MachineFault(condition, str(path), fix)
        if cause.errno == errno.ENOENT and not (folder.is_dir() and path.parent.is_dir()):
            return MachineFault(VANISHED[0], str(_topmost_missing(folder if not folder.is_dir() else path.parent)),
                                VANISHED[1])
    return None


def probe(folder: Path) -> MachineFault | None:
    """The machine fault a write into ``folder`` meets now, if any: for a driver whose workers could not say."""
    probe_file = folder / f".fault-probe-{os.getpid()}"
    try:
        storage.check_space(probe_file, 0)
        probe_file.write_bytes(b"")
        probe_file.unlink()
    except OSError as err:
        return machine_fault(err, folder)
    return None


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _topmost_missing(path: Path) -> Path:
    """The highest folder of ``path`` that no longer exists: what vanished."""
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path
