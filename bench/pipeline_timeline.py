"""train.py with every DeepSpeed pipeline instruction of every rank timed on the GPU and the CPU
(bench only): where each stage spends a step, and what it waits for.

Launch it in place of train.py, with the same arguments:

    BENCH_TIMELINE_DIR=/tmp/tl python3 -m deepspeed.launcher.runner --num_gpus=2 \
        bench/pipeline_timeline.py --deepspeed --config run.toml
    python3 bench/pipeline_timeline.py --summarize /tmp/tl     # one table for all ranks

Each instruction (ForwardPass, BackwardPass, SendActivation, RecvGrad, LoadMicroBatch, ...) is
bracketed by CUDA events on the compute stream and by CPU clock readings, so the GPU time of an
instruction includes the GPU's waits inside it (a receive waiting for the other stage, a launch
the CPU had not made yet); NextBatch, inside LoadMicroBatch, is the batch's reading and noising,
the rest of the load DeepSpeed's copies to the GPU. Unlike torch.profiler this costs two events
an instruction, so the steps run at their real speed. Each rank writes timeline-r<rank>.jsonl: one line a step, with
every instruction's name, buffer, CPU start/end and GPU start/end in ms from the step's start.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OUT = Path(os.environ.get("BENCH_TIMELINE_DIR", "/tmp/timeline"))
RANK = int(os.environ.get("RANK", "0"))
# An experiment on the loads: BENCH_STAGE_BATCHES=1 reads a step's micro-batches and copies them to
# the GPU at the step's first load, so DeepSpeed's own loads copy within the GPU (no pageable copy,
# no allocation while kernels are queued). Same numbers; compare the rows' LoadMicroBatch times.
STAGE_BATCHES = os.environ.get("BENCH_STAGE_BATCHES") == "1"


# The cgroup's CPU statistics (v2, then v1 under its two mount names): file, key, ms per unit.
CGROUP_CPU_STATS = (("/sys/fs/cgroup/cpu.stat", "throttled_usec", 1e-3),
                    ("/sys/fs/cgroup/cpu/cpu.stat", "throttled_time", 1e-6),
                    ("/sys/fs/cgroup/cpu,cpuacct/cpu.stat", "throttled_time", 1e-6))


def cpu_throttled_ms(stat_files=CGROUP_CPU_STATS) -> float | None:
    """How long this container's CPU quota has held its processes back so far (the cgroup's
    throttled time, v2 or v1), or None where the kernel does not say. A quota the trainer's
    threads exceed stalls every thread until the next 100 ms period: a stall that lands in an
    instruction shows there as CPU time the instruction's own work cannot explain."""
    for path, key, scale in stat_files:
        try:
            fields = dict(line.split() for line in Path(path).read_text().splitlines() if line.strip())
        except (OSError, ValueError):
            continue
        if key in fields:
            return int(fields[key]) * scale
    return None


def timed_instructions(engine, records: list):
    """The engine's instruction table with each entry timed into `records` (this instance only)."""
    import torch

    cuda = engine.device.type == "cuda" if hasattr(engine.device, "type") else torch.cuda.is_available()

    def timed(name, fn):
        def run(self, **kwargs):
            start = torch.cuda.Event(enable_timing=True) if cuda else None
            end = torch.cuda.Event(enable_timing=True) if cuda else None
            if cuda:
                start.record()
            cpu0 = time.perf_counter()
            result = fn(self, **kwargs)
            cpu1 = time.perf_counter()
            if cuda:
                end.record()
            records.append((name, kwargs.get("buffer_id"), cpu0, cpu1, start, end))
            return result
        return run

    return {kind: timed(kind.__name__, fn) for kind, fn in type(engine)._INSTRUCTION_MAP.items()}


def timed_next_batch(next_batch, records: list, cuda: bool):
    """The engine's `_next_batch` (inside LoadMicroBatch: our collate, reading and noising the
    cached batch) timed as "NextBatch"; the rest of LoadMicroBatch is DeepSpeed's copies to the GPU."""
    import torch

    def run():
        start = torch.cuda.Event(enable_timing=True) if cuda else None
        end = torch.cuda.Event(enable_timing=True) if cuda else None
        if cuda:
            start.record()
        cpu0 = time.perf_counter()
        batch = next_batch()
        cpu1 = time.perf_counter()
        if cuda:
            end.record()
        records.append(("NextBatch", None, cpu0, cpu1, start, end))
        return batch
    return run


def record_steps(trainer_cls):
    """A Trainer subclass whose engine times every instruction of every step."""
    import torch

    class TimedTrainer(trainer_cls):
        def micro_batches(self, epoch: int, step_in_epoch: int):
            batches = super().micro_batches(epoch, step_in_epoch)
            if not STAGE_BATCHES:
                yield from batches
                return
            device = self.engine.device
            staged = [tuple(tuple(t.to(device) for t in part) for part in batch) for batch in batches]
            yield from staged

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            engine = self.engine
            records: list = []
            engine._INSTRUCTION_MAP = timed_instructions(engine, records)
            engine._next_batch = timed_next_batch(engine._next_batch, records, cuda=torch.cuda.is_available())
            engine_step = engine.train_batch
            cuda = torch.cuda.is_available()
            OUT.mkdir(parents=True, exist_ok=True)
            path = OUT / f"timeline-r{RANK}.jsonl"
            path.write_text("")
            collections: list = []  # (generation, ms) of the garbage collector's passes in this step
            started: dict = {}

            def on_gc(phase, info):
                if phase == "start":
                    started["t"] = time.perf_counter()
                elif "t" in started:
                    collections.append((info["generation"], (time.perf_counter() - started.pop("t")) * 1e3))

            gc.callbacks.append(on_gc)

            def train_batch(data_iter):
                records.clear()
                collections.clear()
                begin = torch.cuda.Event(enable_timing=True) if cuda else None
                if cuda:
                    begin.record()
                throttled_before = cpu_throttled_ms()
                cpu_begin = time.perf_counter()
                loss = engine_step(data_iter)
                if cuda:
                    torch.cuda.synchronize()
                wall = time.perf_counter() - cpu_begin
                throttled_after = cpu_throttled_ms()
                rows = []
                for name, buffer, cpu0, cpu1, start, end in records:
                    row = {"op": name, "buffer": buffer, "cpu": [round((cpu0 - cpu_begin) * 1e3, 3),
                                                                  round((cpu1 - cpu_begin) * 1e3, 3)]}
                    if cuda:
                        row["gpu"] = [round(begin.elapsed_time(start), 3), round(begin.elapsed_time(end), 3)]
                    rows.append(row)
                with open(path, "a") as f:
                    f.write(json.dumps({"rank": RANK, "step": self.step + 1, "wall_ms": round(wall * 1e3, 3),
                                        "stage": engine.stage_id, "staged_batches": STAGE_BATCHES, "ops": rows,
                                        "gc_ms": [[g, round(ms, 2)] for g, ms in collections],
                                        "cpu_throttled_ms": None if throttled_before is None else
                                        round(throttled_after - throttled_before, 3)}) + "\n")
                return loss

            engine.train_batch = train_batch  # this instance only, for this measurement

    return TimedTrainer


def summarize(folder: Path, first_step: int = 3) -> str:
    """Per rank, over steps >= first_step: the mean GPU and CPU ms of each instruction kind in a
    step, the GPU's idle time between instructions, and the step's wall; then one step's order."""
    lines = []
    ranks = sorted(folder.glob("timeline-r*.jsonl"), key=lambda p: int(p.stem.split("-r")[1]))
    kinds = ["LoadMicroBatch", "NextBatch", "ForwardPass", "BackwardPass", "SendActivation", "RecvActivation", "SendGrad",
             "RecvGrad", "ReduceTiedGrads", "ReduceGrads", "OptimizerStep"]
    table = {}
    example = {}
    for path in ranks:
        steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        steady = [s for s in steps if s["step"] >= first_step] or steps
        if not steady:
            continue
        rank = steady[0]["rank"]
        gpu, cpu, count, idle, walls = defaultdict(list), defaultdict(list), defaultdict(list), [], []
        gc_full = [sum(ms for g, ms in s.get("gc_ms", []) if g == 2) for s in steady]
        throttled = [s.get("cpu_throttled_ms") for s in steady]
        for s in steady:
            g, c, n = defaultdict(float), defaultdict(float), defaultdict(int)
            last_end = 0.0
            gaps = 0.0
            for op in s["ops"]:
                c[op["op"]] += op["cpu"][1] - op["cpu"][0]
                n[op["op"]] += 1
                if "gpu" in op:
                    g[op["op"]] += op["gpu"][1] - op["gpu"][0]
                    gaps += max(0.0, op["gpu"][0] - last_end)
                    last_end = max(last_end, op["gpu"][1])
            for k in set(c) | set(g):
                gpu[k].append(g[k])
                cpu[k].append(c[k])
                count[k].append(n[k])
            idle.append(gaps + max(0.0, s["wall_ms"] - last_end) if last_end else 0.0)
            walls.append(s["wall_ms"])
        table[rank] = (steady[0]["stage"], gpu, cpu, count, idle, walls, gc_full, throttled)
        example[rank] = steady[0]
    if not table:
        return f"{folder}: no timelines\n"
    lines.append(f"mean ms per step (steps >= {first_step}); GPU = time between the instruction's CUDA events, "
                 f"waits inside it included; CPU = time in the call")
    header = "| instruction | " + " | ".join(f"rank {r} (stage {table[r][0]}) GPU / CPU / n" for r in table) + " |"
    lines += [header, "|---" * (len(table) + 1) + "|"]
    for k in kinds + sorted({k for r in table for k in table[r][1]} - set(kinds)):
        cells = []
        for r in table:
            _, gpu, cpu, count, *_ = table[r]
            if k not in cpu:
                cells.append("-")
                continue
            g = f"{statistics.mean(gpu[k]):.0f}" if gpu[k] and any(gpu[k]) else "-"
            cells.append(f"{g} / {statistics.mean(cpu[k]):.0f} / {statistics.mean(count[k]):.0f}")
        if any(c != "-" for c in cells):
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("| GPU idle between instructions | " + " | ".join(
        f"{statistics.mean(table[r][4]):.0f}" for r in table) + " |")
    lines.append("| full garbage collections (ms, each step) | " + " | ".join(
        " ".join(f"{ms:.0f}" for ms in table[r][6]) for r in table) + " |")
    lines.append("| CPU quota throttling (ms, each step; the container's, all ranks together) | " + " | ".join(
        " ".join("-" if ms is None else f"{ms:.0f}" for ms in table[r][7]) for r in table) + " |")
    lines.append("| step wall | " + " | ".join(f"{statistics.median(table[r][5]):.0f}" for r in table) + " |")
    for r, s in example.items():
        lines.append(f"rank {r} step {s['step']} (stage {s['stage']}), GPU ms from the step's start:")
        parts = []
        for op in s["ops"]:
            if op["op"] in ("ForwardPass", "BackwardPass", "SendActivation", "RecvActivation", "SendGrad", "RecvGrad",
                            "OptimizerStep", "LoadMicroBatch"):
                short = {"ForwardPass": "F", "BackwardPass": "B", "SendActivation": "sA", "RecvActivation": "rA",
                         "SendGrad": "sG", "RecvGrad": "rG", "OptimizerStep": "opt", "LoadMicroBatch": "L"}[op["op"]]
                span = op.get("gpu") or op["cpu"]
                parts.append(f"{short}{op['buffer'] if op['buffer'] is not None else ''}[{span[0]:.0f}-{span[1]:.0f}]")
        for i in range(0, len(parts), 8):
            lines.append("  " + " ".join(parts[i:i + 8]))
    return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) >= 3 and sys.argv[1] == "--summarize":
        first = int(sys.argv[3]) if len(sys.argv) > 3 else 3
        print(summarize(Path(sys.argv[2]), first), end="")
        return 0
    import train
    from training import trainer as trainer_module
    trainer_module.Trainer = record_steps(trainer_module.Trainer)  # train.main builds the trainer from this module
    return train.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
