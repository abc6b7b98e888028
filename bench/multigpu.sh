#!/usr/bin/env bash
# Pipeline stages and data-parallel replicas of FLUX.1 on 1, 2 and 4 GPUs under NCCL: the real
# train.py through DeepSpeed's launcher, random full-size weights, LoRA r32, 1024x1024, bf16,
# activation checkpointing, 8 samples a step; the median s/step of steps 3.. from metrics.jsonl.
# Run from the project's root on a 4-GPU machine (WHEELS=<folder of wheels> installs the missing
# requirements with pip --target). One call can do several parts: PARTS="setup flux".
#   setup    random full-size FLUX.1 (MODEL=flux2: FLUX.2 [dev]) + 8 images under $W (default /tmp/mg)
#   flux     ROWS from: f1 (1 GPU, gas 8)  f2s (2 stages, gas 8)  f2r (2 replicas, gas 4)
#            f4 (2 stages x 2 replicas, gas 4)  f4g8 (2x2, gas 8)  f4r (4 replicas, gas 2)
#            f2sN (2 stages, gas N: the bubble table); STEPS (default 8); EXTRA: top-level config
#            lines added to every row (e.g. 'partition_method = "uniform"'), EXTRA_MODEL: [model]
#            lines (e.g. 'transformer_dtype = "float8"'); TAG suffixes row names; MODEL: the
#            model type and folder (flux, or flux2 from bench/make_full_size_flux2.py); FULL=1:
#            full fine-tuning (no [adapter]; AdamW with stochastic rounding); FULL=plain: without
#            it, for EXTRA='zero_stage = 1' 
#            SCRIPT runs another copy of the trainer (e.g. an earlier commit unpacked by git archive)
#            ON=1,2 runs the rows on those GPUs only (DeepSpeed's --include), so that rows on
#            disjoint GPUs can run at once: (ON=0 ROWS=f1 bash ... & ON=1,2 ROWS=f2s bash ... & wait)
#            TIMELINE=1 runs each row through bench/pipeline_timeline.py (every pipeline instruction
#            of every rank timed with CUDA events) and writes its table to $OUT/timeline-<row>.txt;
#            TIMELINE_SCRIPT: that wrapper in another copy of the trainer (beside its train.py);
#            with BENCH_STAGE_BATCHES=1 (and a TAG) it places each step's micro-batches on the GPU
#            at the step's first load: the experiment that tells whether the loads' time is copying
#   compare  the issue's table with this code (f1 f2s f4r f4g8 f2r f4), and the two rows the fixes
#            changed as they ran before them (TAG _before: partition_method = "parameters" and
#            OMP_NUM_THREADS = all cores in every process); then a table of efficiencies vs f1
#   profile  the same rows for PSTEPS steps with bench/profile_rank.py (torch.profiler per rank,
#            BENCH_PROFILE steps): summaries under $OUT
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -n "${WHEELS:-}" ] && [ ! -d /tmp/site/deepspeed ]; then
  pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl >/dev/null 2>&1 || echo "wheel install had errors"
fi
[ -n "${WHEELS:-}" ] && export PYTHONPATH=/tmp/site
W=${W:-/tmp/mg}; mkdir -p $W; OUT=${OUT:-/tmp/out}; mkdir -p $OUT
MODEL=${MODEL:-flux}
TAG=${TAG:-}

cfg() { # name stages gas steps
  cat > $W/$1-data.toml <<EOF
resolutions = [1024]
enable_ar_bucket = false
[[directory]]
path = "$W/data"
EOF
  cat > $W/$1.toml <<EOF
output_dir = "$W/runs-$1"
dataset = "$W/$1-data.toml"
max_steps = $4
micro_batch_size_per_gpu = 1
pipeline_stages = $2
gradient_accumulation_steps = $3
activation_checkpointing = true
eval_at_start = false
seed = 7
${EXTRA:-}
[model]
type = "$MODEL"
diffusers_path = "$W/models/$MODEL"
dtype = "bfloat16"
${EXTRA_MODEL:-}
EOF
  if [ "${FULL:-}" = plain ]; then  # full fine-tuning with EXTRA='zero_stage = 1' (float32 master weights)
    printf '[optimizer]\ntype = "adamw"\nlr = 1e-5\n' >> $W/$1.toml
  elif [ -n "${FULL:-}" ]; then  # full fine-tuning: no [adapter]; bfloat16 weights need stochastic rounding
    printf '[optimizer]\ntype = "adamw"\nlr = 1e-5\nstochastic_rounding = true\n' >> $W/$1.toml
  else
    printf '[adapter]\ntype = "lora"\nrank = 32\n[optimizer]\ntype = "adamw"\nlr = 1e-4\n' >> $W/$1.toml
  fi
}

launch() { # name ngpus port script
  # Helpers write nothing to stdout: a `sleep` left holding it would keep `| tee` waiting.
  ( nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv,noheader,nounits -lms 500 > $W/$1.smi ) >/dev/null 2>&1 & local smi=$!
  ( sleep 45; nvidia-smi --query-compute-apps=pid,gpu_bus_id,used_memory --format=csv,noheader > $W/$1.apps ) >/dev/null 2>&1 & local apps=$!
  local t0=$(date +%s)
  # In a session of its own, so that a row over its time limit takes every rank with it: a rank
  # left behind spins on its GPU and slows the next rows.
  local gpus="--num_gpus=$2"; [ -n "${ON:-}" ] && gpus="--include localhost:$ON"
  local script=${4:-train.py}
  if [ -n "${TIMELINE:-}" ]; then script=${TIMELINE_SCRIPT:-bench/pipeline_timeline.py}; rm -rf $W/tl-$1; fi
  BENCH_TIMELINE_DIR=$W/tl-$1 setsid -w python3 -m deepspeed.launcher.runner --master_port $3 $gpus $script \
    --deepspeed --config $W/$1.toml > $W/$1.log 2>&1 & local job=$!
  ( sleep ${LAUNCH_LIMIT:-300}; kill -9 -- -$job ) >/dev/null 2>&1 & local watchdog=$!
  wait $job; local rc=$?
  kill -9 -- -$job 2>/dev/null; pkill -P $watchdog 2>/dev/null; pkill -P $apps 2>/dev/null; kill $watchdog $smi $apps 2>/dev/null
  echo "$1: rc=$rc wall=$(( $(date +%s) - t0 ))s"
  [ $rc = 0 ] || { tr '\r' '\n' < $W/$1.log | grep -v "^\s*$\|it/s\|s/it" | tail -25; }
  if [ -n "${TIMELINE:-}" ]; then
    python3 bench/pipeline_timeline.py --summarize $W/tl-$1 > $OUT/timeline-$1.txt 2>&1; head -16 $OUT/timeline-$1.txt
    for f in $W/tl-$1/timeline-r*.jsonl; do cp $f $OUT/$(basename ${f%.jsonl})-$1.jsonl; done 2>/dev/null
  fi
  python3 - $W $1 $2 "${ON:-}" <<'PY'
import json, statistics, sys
from pathlib import Path
W, name, gpus = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
on = {int(i) for i in sys.argv[4].split(",")} if sys.argv[4] else None  # rows beside it use the others
peak, util = {}, {}
for line in (W / f"{name}.smi").read_text().splitlines():
    try: i, m, u = [int(x) for x in line.split(",")]
    except ValueError: continue
    if on is not None and i not in on: continue
    peak[i] = max(peak.get(i, 0), m)
    util.setdefault(i, []).append(u)
apps = (W / f"{name}.apps").read_text().strip().replace("\n", "; ") if (W / f"{name}.apps").exists() else "-"
runs = sorted((W / f"runs-{name}").glob("*/metrics.jsonl"))
if not runs: print(f"  {name}: no metrics.jsonl"); sys.exit()
rows = [json.loads(l) for l in runs[-1].read_text().splitlines()]
sec = [r["seconds"] for r in rows[2:]] or [r["seconds"] for r in rows]
print(f"  {name}: {len(rows)} steps, s/step {[round(r['seconds'], 2) for r in rows]}, median(3..) {statistics.median(sec):.3f}; "
      f"nvidia-smi peak MiB {peak}; mean util% {({i: round(statistics.mean(u)) for i, u in util.items()})}")
print(f"  {name}: GPU processes at 45 s: {apps}")
memory = runs[-1].parent / "memory.json"  # every rank's allocator peak and reserve (training/trainer.py)
row = {"row": name, "gpus": gpus, "s_per_step": statistics.median(sec), "smi_peak_mib": peak,
       "allocator_peak_gib": json.loads(memory.read_text()) if memory.exists() else None,
       "losses": [round(r["train/loss"], 6) for r in rows]}
print("  ROW " + json.dumps(row))
with open(W / "rows.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
PY
}

row() { # row-name steps script
  local n=$1$TAG
  local port=$(( 29600 + $(echo $n | cksum | cut -d' ' -f1) % 300 ))  # rows running at once differ
  case $1 in
    f1) cfg $n 1 8 $2; launch $n 1 $port $3;;
    f2s) cfg $n 2 8 $2; launch $n 2 $port $3;;
    f2r) cfg $n 1 4 $2; launch $n 2 $port $3;;
    f4) cfg $n 2 4 $2; launch $n 4 $port $3;;
    f4g8) cfg $n 2 8 $2; launch $n 4 $port $3;;
    f4r) cfg $n 1 2 $2; launch $n 4 $port $3;;
    f2s*) cfg $n 2 ${1#f2s} $2; launch $n 2 $port $3;;
  esac
}

for part in ${PARTS:-${PART:-flux}}; do
  case $part in
  setup)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    nvidia-smi topo -m 2>/dev/null | head -6
    # A CPU quota below the cores shown stalls the ranks' threads (the timeline's throttling row).
    echo "cpus: nproc $(nproc); cgroup quota $(cat /sys/fs/cgroup/cpu.max 2>/dev/null || echo "$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null) / $(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us 2>/dev/null) us")"
    python3 -c "import torch, deepspeed, diffusers, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(), 'deepspeed', deepspeed.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
    [ -d $W/models/$MODEL ] || python3 bench/make_full_size_${MODEL}.py $W/models > $W/setup.log 2>&1 || tail -5 $W/setup.log
    python3 tools/make_demo_dataset.py $W/data --count 8 > /dev/null
    ;;
  flux)
    for r in ${ROWS:-f1 f2s f2r}; do row $r ${STEPS:-8} ${SCRIPT:-train.py}; done
    ;;
  compare)
    rm -f $W/rows.jsonl
    for r in ${ROWS:-f1 f2s f2s_before f4r f4r_before f4g8 f2r f4}; do
      case $r in
        *_before) ( export TAG=_before EXTRA='partition_method = "parameters"' OMP_NUM_THREADS=$(nproc)
                    row ${r%_before} ${STEPS:-5} train.py );;
        *) row $r ${STEPS:-5} train.py;;
      esac
    done
    python3 - $W <<'PY'
import json, sys
from pathlib import Path
rows = [json.loads(l) for l in (Path(sys.argv[1]) / "rows.jsonl").read_text().splitlines()]
one = next((r["s_per_step"] for r in rows if r["row"] == "f1"), None)
print("| row | GPUs | s/step | x one GPU | efficiency | peak MiB (nvidia-smi) |")
for r in rows:
    speed = one / r["s_per_step"] if one else float("nan")
    print(f"| {r['row']} | {r['gpus']} | {r['s_per_step']:.2f} | {speed:.2f} | {speed / r['gpus']:.0%} | "
          f"{max(r['smi_peak_mib'].values()) if r['smi_peak_mib'] else '-'} |")
PY
    ;;
  profile)
    for r in ${ROWS:-f1 f2s f4r}; do
      rm -rf /tmp/prof; BENCH_PROFILE=${BENCH_PROFILE:-3:plain,4:stack} BENCH_PROFILE_DIR=/tmp/prof row $r ${PSTEPS:-5} bench/profile_rank.py
      cat /tmp/prof/summary-r*.txt > $OUT/profile-$r$TAG.txt 2>/dev/null
      for f in /tmp/prof/ops-r0-*.txt; do cat $f >> $OUT/profile-$r$TAG.txt; done 2>/dev/null
      grep -h "step wall\|GPU busy\|NCCL\|idle gaps\|rank .*threads" /tmp/prof/summary-r*.txt | head -40
    done
    ;;
  esac
done
tar czf $OUT/logs.tgz -C $W $(cd $W && ls *.log 2>/dev/null) 2>/dev/null
