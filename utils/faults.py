"""Faults turned into clear errors (disk full, out of memory), and the hooks the fault tests use.

A full disk shows up in many shapes: OSError ENOSPC from Python's own writes, "No space left on
device (os error 28)" from safetensors, "unexpected pos 576 vs 534" from torch.save. `disk_full`
recognises all of them (the last by the free space left), so the writers can say plainly what
happened and what was kept.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
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


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is torch's out-of-memory error (torch is imported only if it was already)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(error, torch.OutOfMemoryError)


# What gloo and NCCL say in the ranks left behind when another rank's process ends.
_PEER_GONE_TEXTS = ("connection closed by peer", "connection reset by peer", "remote process exited")


def peer_gone(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another rank's process ended."""
    return isinstance(error, RuntimeError) and any(t in str(error).lower() for t in _PEER_GONE_TEXTS)


# DeepSpeed's launcher looks at its ranks once a second and names the first failed one it finds.
_LAUNCHER_POLL_MARGIN_S = 3.0


def let_the_launcher_see_the_first_death() -> None:
    """Before a rank left behind by a dead one exits: wait until DeepSpeed's launcher has seen the
    dead rank and ended this one, so its last line gives the dead rank's own exit code (-9 for
    the kernel's out-of-memory killer) instead of this rank's 1. SIGTERM (what the launcher
    sends) then ends this process at once, with nothing more printed."""
    if not os.environ.get("LOCAL_SIZE"):
        return  # not under DeepSpeed's launcher
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(_LAUNCHER_POLL_MARGIN_S)


OUT_OF_MEMORY_HINT = ("The memory estimate printed at start is per stage; what lowers it: activation_checkpointing "
                      "= true, blocks_to_swap = N, [model] transformer_dtype = 'float8', more pipeline_stages, a "
                      "smaller micro_batch_size_per_gpu or fewer tokens (resolutions, frames); "
                      "memory_budget_gib = N plans for a GPU of N GiB.")


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


def fail_for_fault_tests(point: str, rank: int) -> None:
    """Fault-injection hook for the tests of one rank failing alone: TRAINER_TEST_FAIL_AT=<point>:<rank>
    raises there, on that rank, the out-of-memory error a full GPU raises (e.g. step3:1)."""
    if os.environ.get("TRAINER_TEST_FAIL_AT", "") == f"{point}:{rank}":
        import torch  # this module loads before torch (train.py reports config errors without it)

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (TRAINER_TEST_FAIL_AT)")


class DeadRankWatch:
    """From `start()` until `disarm()`: a SIGTERM or SIGINT that comes after another rank of this
    machine has died ends this process at once, with one line saying so.

    A dead rank leaves the others blocked in their next collective operation, which never
    completes (NCCL waits for minutes). DeepSpeed's launcher then terminates the survivors one
    after another, each with 30 s to exit before SIGKILL: 3 survivors of 4 GPUs would take 90 s,
    7 of 8 over 3 minutes. The graceful stop that the signal otherwise asks for (finish the
    step, checkpoint together) needs every rank, so without one it cannot happen. The signal
    reaches a watching thread through `signal.set_wakeup_fd`, even while the main thread is
    blocked in a collective. Disarm it once this rank is leaving by itself (a finished run, a
    completed stop): then the ranks that left first have not died. Only under DeepSpeed's
    launcher on Linux (its children, LOCAL_SIZE of them, are this machine's ranks); elsewhere
    it does nothing.
    """

    def __init__(self, rank: int):
        self.rank = rank
        self.armed = False

    def start(self) -> None:
        """Call from the main thread, after the signal handlers are installed."""
        expected = int(os.environ.get("LOCAL_SIZE") or 0)
        launcher = os.getppid()
        if expected < 2 or not Path(f"/proc/{launcher}").is_dir():
            return
        read, write = os.pipe()
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self.armed = True
        threading.Thread(target=self._watch, args=(read, launcher, expected), name="dead-rank-watch",
                         daemon=True).start()

    def disarm(self) -> None:
        self.armed = False

    def _watch(self, read: int, launcher: int, expected: int) -> None:
        while os.read(read, 64):
            children = _children(launcher)
            if not self.armed or children is None:
                continue
            alive = [c for c in children if c.alive]
            if len(alive) < expected:
                ended = ended_local_ranks(children, expected)
                which = f" ({', '.join(f'local rank {r}' for r in ended)} ended)" if ended else ""
                print(f"rank {self.rank}: stopping at once: only {len(alive)} of this machine's {expected} ranks "
                      f"are still running{which}, so they cannot finish the step or save a checkpoint together "
                      f"(the last complete checkpoint stays the one to resume from)", file=sys.stderr, flush=True)
                os._exit(1)


@dataclass(frozen=True)
class _Child:
    pid: int
    alive: bool  # not exiting or exited (an exited child stays a zombie until its parent reaps it)
    local_rank: int | None  # from its --local_rank=N argument; None for an exited child (no arguments left)
    status: int  # a zombie's waitpid(2) status (/proc/<pid>/stat's last field): how it ended


def _children(parent: int) -> list[_Child] | None:
    """`parent`'s child processes, from /proc; None when /proc cannot tell."""
    children = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != parent:
                continue
            argv = [a for a in Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0") if a]
            # A process in the middle of exiting has already lost its arguments.
            alive = fields[0] not in ("Z", "X") and bool(argv)
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        rank = next((a.removeprefix("--local_rank=") for a in argv if a.startswith("--local_rank=")), None)
        children.append(_Child(int(entry), alive, int(rank) if rank and rank.isdigit() else None, int(fields[-1])))
    return children


def ended_local_ranks(children: list[_Child], expected: int) -> dict[int, str | None]:
    """Which of this machine's `expected` ranks (DeepSpeed's launcher's children, each given
    --local_rank=N) have ended: {local rank: how, or None where /proc no longer tells}. Empty
    when none has, or when a running child does not say its rank."""
    running = [c.local_rank for c in children if c.alive]
    if None in running:
        return {}
    ended = sorted(set(range(expected)) - set(running))
    zombies = [c.status for c in children if not c.alive]
    # An exited child has no arguments left: its status is that rank's only when one rank ended.
    how = _status_words(zombies[0]) if len(ended) == 1 and len(zombies) == 1 else None
    return {rank: how for rank in ended}


def _status_words(status: int) -> str:
    """A waitpid(2) status in words: "killed by SIGKILL", "exit code 1"."""
    if status & 0x7F:
        try:
            return f"killed by {signal.Signals(status & 0x7F).name}"
        except ValueError:
            return f"killed by signal {status & 0x7F}"
    return f"exit code {(status >> 8) & 0xFF}"


def who_ended_first(wait: float) -> str:
    """What a rank whose partner's connection closed can say of it: which rank of this machine
    ended and how, waiting up to `wait` seconds for its process to finish exiting."""
    ended = _first_ended_local_rank(wait)
    if ended is None or ended[1] is None:
        who = "another rank of the job" if ended is None else f"local rank {ended[0]} of this machine"
        return f"{who} ended first (its own error, or the launcher's exit code for it, says why)"
    local, how = ended
    return f"local rank {local} of this machine ended first ({how}: {_likely_cause(how)})"


def _likely_cause(how: str) -> str:
    """What a way of ending (`_status_words`) most likely means for a training process."""
    if how == "killed by SIGKILL":
        return "a signal from outside, e.g. the kernel's out-of-memory killer or kill -9"
    if how in {f"killed by {name}" for name in ("SIGSEGV", "SIGABRT", "SIGBUS", "SIGILL", "SIGFPE")}:
        return "a crash inside the process, e.g. in a native library"
    if how.startswith("killed"):
        return "a signal from outside"
    return "its output above says why"


def _first_ended_local_rank(wait: float) -> tuple[int, str | None] | None:
    """(local rank, how) of a rank of this machine that ended, waiting up to `wait` seconds for
    one; None when none has (the partner may be on another node) or when not under DeepSpeed's
    launcher."""
    expected = int(os.environ.get("LOCAL_SIZE") or 0)
    if expected < 2:
        return None
    deadline = time.monotonic() + wait
    while True:
        children = _children(os.getppid())
        ended = ended_local_ranks(children, expected) if children is not None else {}
        if ended or time.monotonic() >= deadline:
            return next(iter(ended.items()), None)
        time.sleep(0.05)
