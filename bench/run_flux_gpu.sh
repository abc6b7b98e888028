#!/usr/bin/env bash
# Full-size Flux LoRA on one CUDA GPU with random weights: the real train.py for a few steps,
# then the step-time table (our engine vs a plain loop over our layers vs diffusers + peft).
#   bash bench/run_flux_gpu.sh setup    # random FLUX.1-dev-shaped model + a dataset
#   bash bench/run_flux_gpu.sh train    # deepspeed --num_gpus=1 train.py at 1024x1024, 8 steps
#   bash bench/run_flux_gpu.sh step [step.py args]   # the step-time table (bench/step.py)
# WORK (default /tmp/bench_flux) holds the model, data and runs. train: CKPT="false true" picks the
# activation checkpointing settings; EXTRA (top-level lines) and EXTRA_MODEL ([model] lines) add
# config, e.g. EXTRA="blocks_to_swap = 20" EXTRA_MODEL='transformer_dtype = "float8"'; TAG names the runs.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/bench_flux}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

case "${1:-}" in
setup)
  [ -d "$WORK/models/flux" ] || python3 bench/make_full_size_flux.py "$WORK/models"
  python3 tools/make_demo_dataset.py "$WORK/data" --count 4
  ;;
train)
  for ckpt in ${CKPT:-false true}; do
    cat > "$WORK/dataset.toml" <<TOML
resolutions = [1024]
enable_ar_bucket = false
[[directory]]
path = "$WORK/data"
TOML
    cat > "$WORK/train_$ckpt.toml" <<TOML
output_dir = "$WORK/runs_${TAG:-plain}_$ckpt"
dataset = "$WORK/dataset.toml"
max_steps = ${STEPS:-8}
micro_batch_size_per_gpu = 1
activation_checkpointing = $ckpt
eval_at_start = false
save_dtype = "bfloat16"
${EXTRA:-}
[model]
type = "flux"
diffusers_path = "$WORK/models/flux"
dtype = "bfloat16"
${EXTRA_MODEL:-}
[adapter]
type = "lora"
rank = 32
[optimizer]
type = "adamw"
lr = 1e-5
TOML
    deepspeed --num_gpus=1 train.py --deepspeed --config "$WORK/train_$ckpt.toml" 2>&1 | grep -v "^train:" \
      | { grep -i "estimate\|memory\|GiB\|error\|Traceback" || true; } | tail -12
    python3 - "$WORK/runs_${TAG:-plain}_$ckpt" "$ckpt ${TAG:-plain}" <<'PY'
import json, statistics, sys
from pathlib import Path
run = sorted(Path(sys.argv[1]).iterdir())[-1]
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
steady = [r["seconds"] for r in rows[2:]] or [r["seconds"] for r in rows]
print(f"train.py 1024x1024 LoRA r32 checkpointing, variant={sys.argv[2]}: median {statistics.median(steady):.3f} s/step "
      f"over steps 3-{len(rows)}, peak {max(r['train/peak_memory_gib'] for r in rows):.1f} GiB, "
      f"losses {[round(r['train/loss'], 4) for r in rows]}")
PY
  done
  ;;
step)
  shift
  python3 bench/step.py "$WORK/models/flux" --model flux "$@"
  ;;
*)
  echo "usage: $0 setup|train|step [args]" >&2; exit 2 ;;
esac
