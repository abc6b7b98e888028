"""Writes that a killed run leaves whole or not at all: a temporary name, then a rename."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from utils.faults import remove_quietly


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it, renamed over `path` at the end.
    The temporary name holds the process id: two runs writing one file never share it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def write_json_atomic(path: Path, value) -> None:
    """`value` as indented JSON with sorted keys, written atomically."""
    write_text_atomic(path, json.dumps(value, indent=1, sort_keys=True))


def replace_folder(new: Path, target: Path) -> None:
    """Put folder `new` in the place of `target`. The old one is moved aside first and deleted
    last, so a run killed in between leaves one of the two whole (`<target>.old` at worst)."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
