"""The errors that are the user's to act on, and the exit code each one ends the run with.

Bad input (a config, dataset, media or model file, a checkpoint to resume) exits with 2; a fault
during the run (a non-finite loss, a full disk) with 1. Any other exception is a bug and keeps its
traceback. A leaf module without torch, so that train.py can report a config error before torch loads.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """A problem the user can fix; the message says what and, where it can, how."""

    exit_code = 2
    # Whether every rank that meets it prints it (a fault one rank can meet alone), not only rank 0.
    every_rank = False


class ConfigError(UserError, ValueError):
    """A bad value in a config file; the message names the file and the key."""


class DataError(UserError):
    """The dataset cannot be trained on as configured; the message lists the files and why."""


class MediaError(UserError, ValueError):
    """A media file that cannot be read; the message names the file."""


class ResumeError(UserError):
    """The checkpoint or run to resume from is missing or cannot be loaded."""


class TrainingStopped(UserError):
    """Training cannot go on (a non-finite loss); the message says why and what was kept."""

    exit_code = 1


class DiskFullError(UserError, OSError):
    """A write failed for lack of disk space; the message says what was kept and what to do."""

    exit_code = 1
    every_rank = True

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror
