"""A keyed store of named tensors on disk, built on HF `datasets` (Arrow, memory-mapped).

Each row holds a key and a dict of named tensors. Tensors are stored as their raw bytes with
shape and dtype, so bf16 is kept exactly and never inflated to float32. New rows go into a new
part (a `Dataset.save_to_disk` folder written under a temporary name and renamed when
complete), so a killed write never leaves a part that a later run would trust, and adding
entries never rewrites old ones. Reading memory-maps the Arrow files, so a cache larger than
RAM still trains.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import datasets
import numpy as np
import torch

_DTYPES = {str(d).removeprefix("torch."): d for d in
           (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool, torch.uint8)}
_TMP_PREFIX = ".tmp-"


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
        self._load()

    def _load(self):
        if not self.root.is_dir():
            return
        for part_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if part_dir.name.startswith(_TMP_PREFIX):
                continue  # an interrupted write; never trusted, removed by the next write
            part = datasets.load_from_disk(str(part_dir))
            part_id = len(self.parts)
            self.parts.append(part)
            for row, key in enumerate(part["key"]):
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
        """Add rows as one new part; atomic: the part appears whole or not at all."""
        if not rows:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(_TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
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
        name = f"part-{len(list(self.root.iterdir())):05d}-{uuid.uuid4().hex[:8]}"
        tmp = self.root / f"{_TMP_PREFIX}{name}"
        part.save_to_disk(str(tmp))
        os.replace(tmp, self.root / name)
        loaded = datasets.load_from_disk(str(self.root / name))
        part_id = len(self.parts)
        self.parts.append(loaded)
        for row, key in enumerate(columns["key"]):
            self.index[key] = (part_id, row)
