#!/usr/bin/env bash
# LTX-Video and HunyuanVideo LoRA at full size with random weights, through the real train.py.
#   bash bench/run_video_gpu.sh setup                 # random released-size models + 2 videos (MODELS= picks)
#   bash bench/run_video_gpu.sh train ltx-video       # 768x512, 49 frames
#   bash bench/run_video_gpu.sh train hunyuan-video   # 512x512, 33 frames
#   bash bench/run_video_gpu.sh train wan             # Wan 2.1 14B, 832x480, 81 frames
# Env: WORK (default /tmp/bench_video), STEPS (default 5), CKPT (activation_checkpointing, default true);
# EXTRA (top-level lines) and EXTRA_MODEL ([model] lines) add config, e.g. EXTRA="blocks_to_swap = 20"
# EXTRA_MODEL='transformer_dtype = "float8"'; TAG names the run folder.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/bench_video}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

case "${1:-}" in
setup)
  python3 bench/make_full_size_video.py "$WORK/models" --only ${MODELS:-hunyuan-video ltx-video}
  python3 -c "
import sys; sys.path.insert(0, 'tools')
from make_demo_dataset import make_demo_videos
make_demo_videos('$WORK/data', count=2, frames=(49, 49), size=(768, 512))
make_demo_videos('$WORK/data_wan', count=2, frames=(81, 81), size=(832, 480))"
  ;;
train)
  model=$2
  case $model in
    ltx-video) res='[[768, 512]]'; frames=49; data=data ;;
    hunyuan-video) res='[[512, 512]]'; frames=33; data=data ;;
    wan) res='[[832, 480]]'; frames=81; data=data_wan ;;
  esac
  cat > "$WORK/dataset_$model.toml" <<TOML
resolutions = $res
enable_ar_bucket = false
frame_buckets = [$frames]
[[directory]]
path = "$WORK/$data"
TOML
  cat > "$WORK/train_$model.toml" <<TOML
output_dir = "$WORK/runs_${model}_${TAG:-plain}"
dataset = "$WORK/dataset_$model.toml"
max_steps = ${STEPS:-5}
micro_batch_size_per_gpu = 1
activation_checkpointing = ${CKPT:-true}
eval_at_start = false
${EXTRA:-}
[model]
type = "$model"
diffusers_path = "$WORK/models/$model"
dtype = "bfloat16"
${EXTRA_MODEL:-}
[adapter]
type = "lora"
rank = 32
[optimizer]
type = "adamw"
lr = 1e-5
TOML
  deepspeed --num_gpus=1 train.py --deepspeed --config "$WORK/train_$model.toml" 2>&1 | grep -v "^train:\|Loading weights" | tail -15
  python3 - "$WORK/runs_${model}_${TAG:-plain}" "$model ${TAG:-plain}" <<'PY'
import json, statistics, sys
from pathlib import Path
run = sorted(Path(sys.argv[1]).iterdir())[-1]
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
steady = [r["seconds"] for r in rows[1:]] or [r["seconds"] for r in rows]
print(f"{sys.argv[2]}: median {statistics.median(steady):.3f} s/step over steps 2-{len(rows)}, "
      f"peak {max(r['train/peak_memory_gib'] for r in rows):.1f} GiB, losses {[round(r['train/loss'], 4) for r in rows]}")
PY
  ;;
*)
  echo "usage: $0 setup|train MODEL" >&2; exit 2 ;;
esac
