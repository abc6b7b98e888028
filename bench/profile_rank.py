"""train.py under torch.profiler, for finding where multi-GPU time goes (bench only).

Launch it in place of train.py, with the same arguments:

    BENCH_PROFILE="3:plain,4:stack" BENCH_PROFILE_DIR=/tmp/prof \
        python3 -m deepspeed.launcher.runner --num_gpus=2 bench/profile_rank.py --deepspeed --config run.toml

Each listed step (1-based) of each rank runs under the profiler: "plain" records CPU ops and
GPU kernels, "stack" also every Python call (slower, but it names what the CPU was doing while
a GPU waited). After training, each rank writes summary-r<rank>.txt beside its traces: GPU busy
share of the step, NCCL kernel time by collective, the largest idle gaps of the GPU and, from
a "stack" step, the wall time in each of DeepSpeed's pipeline instructions and which Python
function the CPU was in during the GPU's idle gaps.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import train  # noqa: E402
from training import trainer as trainer_module  # noqa: E402

PLAN = {int(k): v for k, v in (item.split(":") for item in os.environ.get("BENCH_PROFILE", "3:plain").split(",") if item)}
OUT = Path(os.environ.get("BENCH_PROFILE_DIR", "/tmp/prof"))
RANK = int(os.environ.get("RANK", "0"))


class ProfiledTrainer(trainer_module.Trainer):
    """The trainer, with the steps in PLAN run under the profiler."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_walls: dict[str, float] = {}
        engine_step = self.engine.train_batch

        def train_batch(data_iter):
            number = self.step + 1
            mode = PLAN.get(number)
            if mode is None:
                return engine_step(data_iter)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=mode == "stack") as prof:
                start = time.perf_counter()
                loss = engine_step(data_iter)
                torch.cuda.synchronize()
                wall = time.perf_counter() - start
            name = f"r{RANK}-s{number}-{mode}"
            self.step_walls[name] = wall
            prof.export_chrome_trace(str(OUT / f"trace-{name}.json"))
            (OUT / f"ops-{name}.txt").write_text(
                f"step {number} ({mode}) wall {wall * 1e3:.0f} ms\n"
                + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60)
                + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
            return loss

        self.engine.train_batch = train_batch  # this instance only, for this measurement


def intervals_union(spans):
    """Sorted, merged (start, end) intervals."""
    merged = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return merged


def summarize(trace: Path, wall_s: float) -> str:
    events = json.loads(trace.read_text())["traceEvents"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    if not kernels:
        return f"{trace.name}: no GPU events\n"
    t0 = min(e["ts"] for e in kernels)
    t1 = max(e["ts"] + e["dur"] for e in kernels)
    nccl = [e for e in kernels if "nccl" in e["name"].lower()]
    compute = [e for e in kernels if "nccl" not in e["name"].lower() and e.get("cat") == "kernel"]
    busy_all = intervals_union((e["ts"], e["ts"] + e["dur"]) for e in kernels)
    busy_compute = intervals_union((e["ts"], e["ts"] + e["dur"]) for e in compute)
    span = t1 - t0
    lines = [f"== {trace.name}: step wall {wall_s * 1e3:.0f} ms, GPU span {span / 1e3:.0f} ms",
             f"GPU busy (any kernel/copy) {sum(e - s for s, e in busy_all) / 1e3:.0f} ms; compute kernels (no NCCL) "
             f"{sum(e - s for s, e in busy_compute) / 1e3:.0f} ms = {sum(e - s for s, e in busy_compute) / (wall_s * 1e6):.0%} "
             f"of the step wall"]
    by_kind = defaultdict(lambda: [0.0, 0])
    for e in nccl:
        kind = re.sub(r"ncclDevKernel_|ncclKernel_|\(.*", "", e["name"])[:40]
        by_kind[kind][0] += e["dur"]
        by_kind[kind][1] += 1
    copies = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        if e.get("cat") != "kernel":
            copies[e["name"][:40]][0] += e["dur"]
            copies[e["name"][:40]][1] += 1
    for title, table in (("NCCL kernels", by_kind), ("copies/memsets", copies)):
        for k, (d, n) in sorted(table.items(), key=lambda kv: -kv[1][0]):
            lines.append(f"  {title}: {k}: {d / 1e3:.1f} ms in {n}")
    # Idle gaps of the compute kernels (NCCL waits count as idle: nothing is computed).
    gaps = [(busy_compute[i + 1][0] - busy_compute[i][1], busy_compute[i][1]) for i in range(len(busy_compute) - 1)]
    big = [g for g in gaps if g[0] > 500]
    lines.append(f"compute idle gaps > 0.5 ms: {len(big)}, {sum(g for g, _ in big) / 1e3:.0f} ms in all; "
                 f"gaps > 0.05 ms: {sum(g for g, _ in gaps if g > 50) / 1e3:.0f} ms")
    # What the CPU was in (innermost python functions) during each big gap, when stacks were recorded.
    py = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                if e.get("cat") == "python_function" and "dur" in e)
    if py:
        starts = [p[0] for p in py]
        blame = defaultdict(float)
        for g, at in big:
            mid = at + g / 2
            i = bisect.bisect_right(starts, mid)
            covering = [p for p in py[max(0, i - 20000):i] if p[1] >= mid]
            pipe = [p[2] for p in covering if "_exec_" in p[2] or "train_batch" in p[2]]
            inner = sorted(covering, key=lambda p: p[0])[-3:]
            key = (pipe[-1].split(": ")[-1] if pipe else "?") + " <- " + " > ".join(
                p[2].split(": ")[-1][:40] for p in inner)
            blame[key] += g
        for k, d in sorted(blame.items(), key=lambda kv: -kv[1])[:12]:
            lines.append(f"  gap {d / 1e3:7.1f} ms in: {k}")
        instr = defaultdict(lambda: [0.0, 0])
        for s, e, name in py:
            m = re.search(r"(_exec_\w+|_aggregate_total_loss|allreduce_gradients|_take_model_step|train_batch"
                          r"|buffered_allreduce_fallback|_send_tensor_meta|_recv_tensor_meta|micro_batches|collate)$", name)
            if m and ("deepspeed" in name or "utils" in name or "Trainer" in name or "trainer" in name):
                instr[m.group(1)][0] += e - s
                instr[m.group(1)][1] += 1
        lines.append("CPU wall per pipeline instruction (nested calls counted in their parents too):")
        for k, (d, n) in sorted(instr.items(), key=lambda kv: -kv[1][0]):
            lines.append(f"  {k:32s} {d / 1e3:8.1f} ms in {n}")
    else:
        for g, at in sorted(big, reverse=True)[:8]:
            lines.append(f"  gap {g / 1e3:.1f} ms at +{(at - t0) / 1e3:.0f} ms")
    top = defaultdict(lambda: [0.0, 0])
    for e in compute:
        top[e["name"][:70]][0] += e["dur"]
        top[e["name"][:70]][1] += 1
    lines.append("top compute kernels:")
    for k, (d, n) in sorted(top.items(), key=lambda kv: -kv[1][0])[:8]:
        lines.append(f"  {d / 1e3:8.1f} ms {n:6d}x {k}")
    return "\n".join(lines) + "\n"


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    trainer_module.Trainer = ProfiledTrainer  # train.main builds the trainer from this module
    holder = {}
    original_run = ProfiledTrainer.run

    def run(self):
        holder["trainer"] = self
        return original_run(self)

    ProfiledTrainer.run = run
    code = train.main(sys.argv[1:])
    trainer = holder.get("trainer")
    header = (f"rank {RANK}: cuda device {torch.cuda.current_device()}, torch threads {torch.get_num_threads()}, "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, visible {os.environ.get('CUDA_VISIBLE_DEVICES')}\n")
    parts = [header]
    if trainer is not None:
        for name, wall in trainer.step_walls.items():
            parts.append(summarize(OUT / f"trace-{name}.json", wall))
    (OUT / f"summary-r{RANK}.txt").write_text("".join(parts))
    return code


if __name__ == "__main__":
    sys.exit(main())
