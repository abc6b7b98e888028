"""This process's place in the job, and the few collectives the run needs.

`Distributed` is made once at start (`init_distributed`) and passed to whatever depends on the
rank, instead of loose rank, world and device values. Alone (world 1) there may be no process
group: every collective is then the value itself.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


def available_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def local_processes(env) -> int:
    """Processes of this launch on this machine (`env` is os.environ or alike): DeepSpeed's
    LOCAL_SIZE, torchrun's LOCAL_WORLD_SIZE, 1 for a plain process."""
    return max(1, int(env.get("LOCAL_SIZE") or env.get("LOCAL_WORLD_SIZE") or 1))


@dataclass(frozen=True)
class Distributed:
    """Rank and world size, the local device, and the pipeline split: `stages` pipeline stages,
    each replicated `dp_world` times, numbered as DeepSpeed's PipeDataParallelTopology numbers
    them (rank = stage * dp_world + dp_rank)."""

    rank: int
    world: int
    device: torch.device
    stages: int = 1

    @classmethod
    def alone(cls, device: torch.device | str = "cpu") -> Distributed:
        """A single process: rank 0 of 1."""
        return cls(0, 1, torch.device(device))

    def with_stages(self, stages: int) -> Distributed:
        """The same process in a job split into `stages` pipeline stages."""
        return dataclasses.replace(self, stages=stages)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and writes the shared files."""
        return self.rank == 0

    @property
    def dp_world(self) -> int:
        """Data-parallel replicas of the pipeline."""
        return self.world // self.stages

    @property
    def dp_rank(self) -> int:
        """This process's replica."""
        return self.rank % self.dp_world

    @property
    def stage(self) -> int:
        """This process's pipeline stage."""
        return self.rank // self.dp_world

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast_object(self, value):
        """Rank 0's `value` on every rank (a picklable object)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, value) -> list | None:
        """Every rank's `value`, in rank order, on rank 0; None on the other ranks."""
        if self.world == 1:
            return [value]
        gathered = [None] * self.world if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def all_gather_object(self, value) -> list:
        """Every rank's `value`, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def folder_leaders(self, folder: Path) -> list[int]:
        """For every rank, the lowest rank that sees the same `folder` (a folder on a filesystem
        several nodes share is one folder; on nodes with their own disks each node has its own):
        the ranks that write there. One probe file per filesystem, written by its lowest rank."""
        if self.world == 1:
            return [0]
        folder.mkdir(parents=True, exist_ok=True)
        nonce = self.broadcast_object(uuid.uuid4().hex if self.is_main else None)
        leaders = [-1] * self.world
        while -1 in leaders:
            leader = leaders.index(-1)
            probe = folder / f".probe-{nonce}-{leader}"
            if self.rank == leader:
                probe.touch()
            self.barrier()
            sees = leaders[self.rank] == -1 and probe.exists()
            for rank, seen in enumerate(self.all_gather_object(sees)):
                if seen:
                    leaders[rank] = leader
            self.barrier()
            if self.rank == leader:
                probe.unlink(missing_ok=True)
            # A leader that cannot see its own probe (a folder it cannot write) leads only itself.
            leaders[leader] = leader
        return leaders

    def max_over_ranks(self, value: int) -> int:
        """The largest of every rank's `value` (one tiny all-reduce)."""
        return self._all_reduce(value, dist.ReduceOp.MAX)

    def min_over_ranks(self, value: int) -> int:
        """The smallest of every rank's `value` (one tiny all-reduce)."""
        return self._all_reduce(value, dist.ReduceOp.MIN)

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank: the same answer everywhere, so that all ranks take
        the same branch (one that stops alone would leave the others waiting forever)."""
        return bool(self.max_over_ranks(int(flag)))

    def _all_reduce(self, value: int, op) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=op)
        return int(t.item())
