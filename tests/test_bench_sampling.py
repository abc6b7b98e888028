"""bench/sample_speed.py stays runnable: both rows (our engine, the diffusers pipeline) on tiny
models on the CPU give a time per sample."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from make_tiny_models import make_tiny_ltx_video


@pytest.mark.slow
@pytest.mark.parametrize("name, size", [("flux", ["--resolution", "64"]),
                                        ("ltx-video", ["--resolution", "64x32", "--frames", "9"])])
def test_sample_speed_rows_run_on_tiny_models(tmp_path, tiny_models, name, size):
    work = tmp_path / "work"
    if name == "flux":
        shutil.copytree(tiny_models / "flux", work / "flux")
    else:
        make_tiny_ltx_video(work)
    out = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "sample_speed.py"), str(work), "--model", name, *size,
                           "--steps", "2", "--samples", "1", "--warmup", "0", "--device", "cpu", "--dtype", "float32",
                           "--text_len", "16", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["mode"] for r in rows] == ["engine", "diffusers"]
    for r in rows:
        assert "error" not in r, r
        assert r["s_per_sample"] > 0
    assert rows[0]["decode_s"] > 0
