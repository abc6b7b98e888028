"""A keyed store of named tensors on disk, built on HF `datasets` (Arrow, memory-mapped).

Each row holds a key and a dict of named tensors. Tensors are stored as their raw bytes with
shape and dtype, so bf16 is kept exactly and never inflated to float32. New rows go into a new
part (a `Dataset.save_to_disk` folder written under a temporary name and renamed when
complete), so a killed write never leaves a part that a later run would trust, and adding
entries never rewrites old ones. Reading memory-maps the Arrow files, so a cache larger than
RAM still trains.

Each part holds a small manifest (its row count and file sizes). A part that fails to load or
does not match its manifest (a truncated or deleted file, garbage written over it) is damaged:
it is left out, listed in `damaged`, and removed at the next write, so its entries are simply
encoded again. A full disk during a write leaves the store as it was and raises DiskFullError.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import datasets
import numpy as np
import torch

from utils.faults import disk_full, disk_full_error, pause_for_fault_tests, remove_quietly

_DTYPES = {str(d).removeprefix("torch."): d for d in
           (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool, torch.uint8)}
_TMP_PREFIX = ".tmp-"
_PART_PREFIX = "part-"
MANIFEST = "tensor_store_part.json"


def tensor_to_bytes(t: torch.Tensor) -> tuple[bytes, list[int], str]:
    t = t.detach().contiguous().cpu()
    dtype = str(t.dtype).removeprefix("torch.")
    # numpy has no bfloat16: view the bits as int16 to keep them exactly.
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return raw.numpy().tobytes(), list(t.shape), dtype


def bytes_to_tensor(data: bytes, shape: list[int], dtype: str) -> torch.Tensor:
    torch_dtype = _DTYPES[dtype]
    if torch_dtype == torch.bfloat16:
        arr = np.frombuffer(data, dtype=np.int16)
        return torch.from_numpy(arr.copy()).view(torch.bfloat16).reshape(shape)
    np_dtype = torch.empty(0, dtype=torch_dtype).numpy().dtype
    return torch.from_numpy(np.frombuffer(data, dtype=np_dtype).copy()).reshape(shape)


class TensorStore:
    """Rows of `key -> {name: tensor}` in append-only parts under `root`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.parts: list[datasets.Dataset] = []
        self.index: dict[str, tuple[int, int]] = {}
        # (path, reason) of every part found damaged; left out of the index.
        self.damaged: list[tuple[Path, str]] = []
        self._load()

    def _load(self):
        if self.root.exists() and not self.root.is_dir():
            self.damaged.append((self.root, "is a file, not the cache folder"))
            return
        if not self.root.is_dir():
            return
        # Interrupted writes (.tmp-*) are never trusted; the next write removes them.
        for part_dir in sorted(p for p in self.root.iterdir() if p.name.startswith(_PART_PREFIX)):
            reason = _check_part(part_dir)
            part = None
            if reason is None:
                try:
                    part = datasets.load_from_disk(str(part_dir))
                    keys = part["key"]
                except Exception as e:  # anything the Arrow reader makes of a damaged file
                    reason = f"cannot be read ({type(e).__name__}: {str(e)[:200]})"
            if reason is None:
                reason = _check_rows(part_dir, part)
            if reason is not None:
                self.damaged.append((part_dir, reason))
                continue
            part_id = len(self.parts)
            self.parts.append(part)
            for row, key in enumerate(keys):
                self.index[key] = (part_id, row)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def get(self, key: str) -> dict[str, torch.Tensor]:
        part_id, row = self.index[key]
        record = self.parts[part_id][row]
        names = [c.removesuffix(".shape") for c in record if c.endswith(".shape")]
        return {n: bytes_to_tensor(record[n], record[f"{n}.shape"], record[f"{n}.dtype"]) for n in names}

    def write_part(self, rows: list[tuple[str, dict[str, torch.Tensor]]]) -> None:
        """Add rows as one new part; atomic: the part appears whole or not at all.

        Raises DiskFullError, with the store unchanged, when the disk is full.
        """
        if not rows:
            return
        self.remove_leftovers()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._write_part(rows)
        except Exception as e:
            if disk_full(e, self.root):
                raise disk_full_error(self.root, f"{len(rows)} cache entries", "The cache entries written "
                                      "before are kept, and the next run encodes only what is missing.") from e
            raise

    def remove_leftovers(self) -> None:
        """Delete interrupted writes whose process is gone, and the damaged parts found at load."""
        if self.root.exists() and not self.root.is_dir():
            remove_quietly(self.root)
            return
        if not self.root.is_dir():
            return
        for stale in self.root.glob(_TMP_PREFIX + "*"):
            if not _writer_alive(stale.name):
                shutil.rmtree(stale, ignore_errors=True)
        for part_dir, _ in self.damaged:
            remove_quietly(part_dir)
        self.damaged = []

    def _write_part(self, rows) -> None:
        columns: dict[str, list] = {"key": []}
        names = sorted(rows[0][1])
        for n in names:
            columns[n], columns[f"{n}.shape"], columns[f"{n}.dtype"] = [], [], []
        for key, tensors in rows:
            if sorted(tensors) != names:
                raise ValueError(f"row {key} has tensors {sorted(tensors)}, expected {names}")
            columns["key"].append(key)
            for n in names:
                data, shape, dtype = tensor_to_bytes(tensors[n])
                columns[n].append(data)
                columns[f"{n}.shape"].append(shape)
                columns[f"{n}.dtype"].append(dtype)
        features = datasets.Features({"key": datasets.Value("string"),
                                      **{c: datasets.Value("binary") for c in names},
                                      **{f"{n}.shape": datasets.Sequence(datasets.Value("int64")) for n in names},
                                      **{f"{n}.dtype": datasets.Value("string") for n in names}})
        part = datasets.Dataset.from_dict(columns, features=features)
        name = f"{_PART_PREFIX}{len(list(self.root.iterdir())):05d}-{uuid.uuid4().hex[:8]}"
        # The writer's pid in the name: a concurrent run's write in progress is never removed.
        tmp = self.root / f"{_TMP_PREFIX}{os.getpid()}-{name}"
        try:
            part.save_to_disk(str(tmp))
            _write_manifest(tmp, len(rows))
            pause_for_fault_tests(f"cache_part_{self.root.name}")
            os.replace(tmp, self.root / name)
        except BaseException:
            remove_quietly(tmp)
            raise
        loaded = datasets.load_from_disk(str(self.root / name))
        part_id = len(self.parts)
        self.parts.append(loaded)
        for row, key in enumerate(columns["key"]):
            self.index[key] = (part_id, row)


def _write_manifest(part_dir: Path, rows: int) -> None:
    files = {f.name: f.stat().st_size for f in sorted(part_dir.iterdir()) if f.is_file()}
    (part_dir / MANIFEST).write_text(json.dumps({"rows": rows, "files": files}, sort_keys=True))


def _check_part(part_dir: Path) -> str | None:
    """Why the part's files do not match its manifest, or None. Parts from before manifests
    existed have none and are checked by loading alone."""
    if not part_dir.is_dir():
        return "is not a folder"
    manifest_path = part_dir / MANIFEST
    if not manifest_path.exists():
        return None if (part_dir / "state.json").is_file() else "is incomplete (no state.json)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"has an unreadable {MANIFEST}"
    for name, size in files.items():
        f = part_dir / name
        if not f.is_file():
            return f"lacks its file {name}"
        if f.stat().st_size != size:
            return f"file {name} has {f.stat().st_size} bytes, {size} were written"
    return None


def _check_rows(part_dir: Path, part) -> str | None:
    try:
        manifest = json.loads((part_dir / MANIFEST).read_text())
    except OSError:
        return None  # a part from before manifests existed
    except ValueError:
        return f"has an unreadable {MANIFEST}"
    if isinstance(manifest, dict) and manifest.get("rows") != len(part):
        return f"has {len(part)} rows, {manifest.get('rows')} were written"
    return None


def _writer_alive(tmp_name: str) -> bool:
    """Whether the process that is writing temporary part `tmp_name` still runs."""
    pid_text = tmp_name.removeprefix(_TMP_PREFIX).split("-", 1)[0]
    if not pid_text.isdigit():
        return False  # from before pids were in the names
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
