"""What a new user meets first: DeepSpeed's one-time CPU op build, Ctrl-C through DeepSpeed's
launcher, and train.py run as one plain process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port, write_configs
from utils.schema import ConfigError


def test_torch_extensions_are_built_per_python_environment(monkeypatch, tmp_path):
    from utils.engine import torch_extensions_dir

    # setenv first: monkeypatch then restores the variable as it was, also when it was unset.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "unset below")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    if os.access(sys.prefix, os.W_OK):
        assert torch_extensions_dir() == Path(sys.prefix) / "torch_extensions"
        assert os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert torch_extensions_dir() == tmp_path  # the user's choice stands


def test_cpu_comm_op_build_needs_a_compiler_and_is_announced(monkeypatch, tmp_path):
    from utils.engine import prepare_cpu_comm_op

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing built here yet
    monkeypatch.setenv("CXX", "no-such-c++")
    with pytest.raises(ConfigError) as info:
        prepare_cpu_comm_op()
    assert str(info.value).startswith("a C++ compiler is needed: on a CPU, DeepSpeed compiles its communication op "
                                      "(deepspeed_shm_comm) once per Python environment, and the compiler "
                                      "'no-such-c++' was not found; install one (Debian/Ubuntu: apt-get install g++")
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler here")
    monkeypatch.setenv("CXX", compiler)
    said = []
    prepare_cpu_comm_op(log=said.append)
    assert said == [f"compiling DeepSpeed's CPU communication op (deepspeed_shm_comm) into "
                    f"{tmp_path / 'deepspeed_shm_comm'}: once for this Python environment, about a minute"]
    # Built once: nothing more to say, and no compiler needed.
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").touch()
    monkeypatch.setenv("CXX", "no-such-c++")
    said.clear()
    prepare_cpu_comm_op(log=said.append)
    assert said == []
