"""Process start-up: torch.distributed through DeepSpeed, the processes' meeting point, CPU
threads, DeepSpeed's CPU communication op, and the attention default."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.git_version_info import installed_ops
from torch.utils.cpp_extension import get_cxx_compiler, get_default_build_root, is_ninja_available

from utils.dist import Distributed, available_cores, local_processes
from utils.errors import ConfigError


def init_distributed() -> Distributed:
    """Start torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPU); this process's
    place in the job, one pipeline stage until `Distributed.with_stages` says otherwise.

    Works under the `deepspeed` launcher and as a plain single process. When every process runs
    on this machine, they meet through a file unique to their launch (see `local_rendezvous`),
    not the launcher's port: two runs started with the default port (29500) do not clash. Across
    machines the port comes from MASTER_PORT (the launcher's `--master_port`), and a port in use
    is an error saying so.
    """
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    rendezvous = local_rendezvous()
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.set_num_threads(cpu_threads_per_process(os.environ, available_cores()))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        configure_attention()
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        prepare_cpu_comm_op(log=print if os.environ["RANK"] == "0" else lambda *_: None)
    try:
        if rendezvous is None:
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
        else:
            deepspeed.init_distributed(dist_backend=backend, verbose=False, init_method=f"file://{rendezvous}",
                                       rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    except RuntimeError as e:
        if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower():
            port = os.environ["MASTER_PORT"]
            raise ConfigError(f"--master_port: port {port} is in use on {os.environ['MASTER_ADDR']} (by another run?); "
                              f"launch with a free one: deepspeed --master_port=<port> ...") from None
        raise
    _unlink_shared_memory_name(dist.get_rank(), dist.get_world_size())
    return Distributed(dist.get_rank(), dist.get_world_size(), device)


def cpu_threads_per_process(env, cores: int) -> int:
    """torch's CPU threads for one process: OMP_NUM_THREADS when set, else this machine's cores
    shared among its processes of the launch.

    Each process would otherwise start a thread per core: 4 processes on a 64-core machine
    make 256 threads, which spin after every CPU operation (noise, packing) and slow the other
    processes' Python thread, the one that launches the GPU work.
    """
    if env.get("OMP_NUM_THREADS"):
        return max(1, int(env["OMP_NUM_THREADS"]))
    return max(1, cores // local_processes(env))


def torch_extensions_dir() -> Path:
    """Where torch builds C++ extensions (DeepSpeed's JIT-compiled ops) for this run: the user's
    TORCH_EXTENSIONS_DIR, else a folder in this Python environment (set in the environment for
    the build). torch's own default, ~/.cache/torch_extensions, is shared by every environment
    of the user, so two environments would rebuild an op for each other at every start."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
    # Unset (a read-only environment): torch's default, in a folder per Python version and device.
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def prepare_cpu_comm_op(log=print) -> None:
    """DeepSpeed on the CPU compiles its shared-memory communication op, deepspeed_shm_comm, when
    it starts (deepspeed.comm.torch.build_shm_op: on Linux, whenever the op was not built at
    install time; no setting skips it). Before that: a missing C++ compiler is one line saying
    what to install, and a build that is about to run is announced, as it takes a minute."""
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or installed_ops.get(builder.NAME) or not builder.is_compatible():
        return
    folder = torch_extensions_dir() / builder.NAME
    if (folder / f"{builder.NAME}.so").is_file():
        return  # built before in this environment
    compiler = get_cxx_compiler()
    if shutil.which(compiler) is None:
        raise ConfigError(f"a C++ compiler is needed: on a CPU, DeepSpeed compiles its communication op "
                          f"({builder.NAME}) once per Python environment, and the compiler {compiler!r} was not "
                          f"found; install one (Debian/Ubuntu: apt-get install g++; Fedora/RHEL: dnf install "
                          f"gcc-c++; or set CXX to a compiler) and run again")
    if not is_ninja_available():
        raise ConfigError(f"the ninja build tool is needed: on a CPU, DeepSpeed compiles its communication op "
                          f"({builder.NAME}) once per Python environment; install it (pip install ninja) and run again")
    log(f"compiling DeepSpeed's CPU communication op ({builder.NAME}) into {folder}: once for this Python "
        f"environment, about a minute")


def _unlink_shared_memory_name(rank: int, world: int) -> None:
    """Remove the name of this process's DeepSpeed shared-memory segment once every process has
    mapped it.

    On CPU, DeepSpeed's all-reduce maps a 64 MiB segment per process, /dev/shm/
    deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, and never deletes it: each
    launch would leave its segments behind until the machine runs out of memory. Every process
    maps all of them while DeepSpeed starts; after a barrier the names can go, and the memory is
    freed when the last process exits, however it exits.
    """
    if world > 1:
        dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    try:
        (Path("/dev/shm") / name).unlink(missing_ok=True)
    except OSError:
        pass  # not Linux, or not ours: nothing to tidy


def local_rendezvous() -> str | None:
    """The file the processes of this launch meet through, or None to use MASTER_ADDR:MASTER_PORT.

    Only when every rank runs on this machine (a single process, or the deepspeed or torchrun
    launcher on one node): they are all children of the same launcher process, so its pid and
    start time name the launch uniquely. MASTER_PORT is then set to the launcher's pid, because
    DeepSpeed names its shared-memory segments after it (the port is not used for a socket).
    """
    world = int(os.environ["WORLD_SIZE"])
    local = os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE")
    if world == 1:
        owner = os.getpid()  # alone: nobody to meet, but a store is still needed
    elif local == str(world) and os.environ.get("CROSS_SIZE", "1") == "1":
        owner = os.getppid()
    else:
        return None
    try:
        started = Path(f"/proc/{owner}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "0"
    os.environ["MASTER_PORT"] = str(owner)
    name = f"trainer-rendezvous-{socket.gethostname()}-{os.getuid()}-{owner}-{started}"
    return str(Path(tempfile.gettempdir()) / name)


def configure_attention() -> None:
    """Keep scaled-dot-product attention off the cuDNN backend, which can fail at Flux's shapes and
    break the CUDA context (docs/benchmarks.md, "Fast settings"; bench/attention_backends.py);
    `attention_backend = "_native_cudnn"` opts in through diffusers' backend."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
