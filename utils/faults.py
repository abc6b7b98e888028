"""Faults turned into clear errors (disk full), and the hooks the fault tests use.

A full disk shows up in many shapes: OSError ENOSPC from Python's own writes, "No space left on
device (os error 28)" from safetensors, "unexpected pos 576 vs 534" from torch.save. `disk_full`
recognises all of them (the last by the free space left), so the writers can say plainly what
happened and what was kept.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

from utils.errors import DiskFullError

_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_DISK_FULL_TEXTS = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
# Below this much space a failed write is taken to be the full disk, whatever the error says.
_NEARLY_FULL_BYTES = 1 << 20


def free_bytes(path: Path) -> int | None:
    """Free space for this user on the disk holding `path` (its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def disk_full(error: BaseException, path: Path | None = None) -> bool:
    """Whether `error`, raised while writing under `path`, comes from a full disk (without a
    path, only by what the error says)."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(seen).lower() for text in _DISK_FULL_TEXTS):
            return True
        seen = seen.__cause__ or seen.__context__
    free = free_bytes(path) if path is not None else None
    return free is not None and free < _NEARLY_FULL_BYTES


def disk_full_error(path: Path, what: str, kept: str) -> DiskFullError:
    """The error for a write of `what` to `path` that the full disk stopped."""
    free = free_bytes(path)
    left = f" ({_size(free)} free)" if free is not None else ""
    return DiskFullError(f"disk full: cannot write {what} to {path}{left}. {kept} "
                         f"Free some space on that disk and run again.")


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def remove_quietly(path: Path) -> None:
    """Delete a half-written file or folder; a failure here must not hide the first error."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def pause_for_fault_tests(point: str) -> None:
    """Fault-injection hook for the tests that kill a run at a fragile moment:
    TRAINER_TEST_PAUSE_AT=<point>:SECONDS holds the run there (e.g. checkpoint4, cache_part_latents)."""
    spec = os.environ.get("TRAINER_TEST_PAUSE_AT", "")
    if spec.startswith(point + ":"):
        time.sleep(float(spec.split(":", 1)[1]))
