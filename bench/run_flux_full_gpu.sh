#!/usr/bin/env bash
# Full fine-tuning on one CUDA GPU: a random-weight Flux of the released width with 6 + 12 blocks
# (3.8B, so a run and its two saved copies fit a 64 GB disk) at 1024x1024, through the real
# train.py, in three memory setups. Prints each run's memory estimate (as train.py prints it at
# start), the measured peak (torch.cuda.max_memory_allocated), step times, losses and the saved
# files. The numbers in docs/full_finetune.md come from this script.
#   bash bench/run_flux_full_gpu.sh      # WORK (default /tmp/bench_flux_full) holds everything
# Env: BLOCKS="19 38" gives the full FLUX.1-dev depth (11.9B; its two saved copies need 48 GB, so
# point RUNS at a roomy folder, e.g. /dev/shm); RUNS (default WORK) holds the run folders; ONLY
# names the setups to run (default: all three).
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/bench_flux_full}
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
BLOCKS=${BLOCKS:-6 12}
RUNS=${RUNS:-$WORK}
[ -d "$WORK/models/flux" ] || python3 - "$WORK/models" $BLOCKS <<'PY'
import sys; sys.path.insert(0, "bench"); sys.path.insert(0, "tools")
import make_full_size_flux as m
m.FLUX_DEV_TRANSFORMER.update(num_layers=int(sys.argv[2]), num_single_layers=int(sys.argv[3]))
m.make_full_size_flux(sys.argv[1])
PY
python3 tools/make_demo_dataset.py "$WORK/data" --count 4 > /dev/null
printf 'resolutions = [1024]\nenable_ar_bucket = false\n[[directory]]\npath = "%s/data"\n' "$WORK" > "$WORK/dataset.toml"

run() {  # name, top-level lines, [optimizer] lines
  cat > "$WORK/$1.toml" <<TOML
output_dir = "$RUNS/runs_$1"
dataset = "$WORK/dataset.toml"
max_steps = 5
micro_batch_size_per_gpu = 1
eval_at_start = false
save_dtype = "bfloat16"
$2
[model]
type = "flux"
diffusers_path = "$WORK/models/flux"
dtype = "bfloat16"
[optimizer]
lr = 1e-5
$3
TOML
  case " ${ONLY:-$1} " in *" $1 "*) ;; *) return ;; esac
  start=$(date +%s)
  deepspeed --num_gpus=1 train.py --deepspeed --config "$WORK/$1.toml" > "$WORK/$1.log" 2>&1; rc=$?
  echo "== $1 (rc $rc, $(( $(date +%s) - start )) s)"
  grep -A1 "memory estimate" "$WORK/$1.log"
  python3 - "$RUNS/runs_$1" <<'PY'
import json, sys
from pathlib import Path
run = sorted(Path(sys.argv[1]).iterdir())[-1]
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
print(f"measured peak {max(r['train/peak_memory_gib'] for r in rows):.2f} GiB; s/step "
      f"{[round(r['seconds'], 2) for r in rows]}; losses {[round(r['train/loss'], 4) for r in rows]}")
files = sorted(p for p in (run / "models" / "final").rglob("*") if p.is_file())
print("saved:", [(str(f.relative_to(run)), round(f.stat().st_size / 2**30, 2)) for f in files])
PY
  rm -rf "$RUNS/runs_$1"  # two copies of the model per run: keep the disk free
}
run adafactor_sr_ckpt 'activation_checkpointing = true' $'type = "adafactor"\nstochastic_rounding = true'
run adafactor_sr_selective 'activation_checkpointing = "selective"' $'type = "adafactor"\nstochastic_rounding = true'
run adamw_plain_nockpt 'activation_checkpointing = false' 'type = "adamw"'
