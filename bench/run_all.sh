#!/usr/bin/env bash
# Issue 6's benchmark on one CUDA GPU, from a fresh clone with the requirements installed. Writes
# random-weight models at the released sizes under WORK (those already there are kept), then prints
# the step-time tables of bench/step.py (our engine and layers rows and the plain diffusers + peft
# loop) for Flux 1024x1024 and 512x512, LTX-Video 768x512x49 and HunyuanVideo 512x512x33, and the
# caching throughput of bench/cache_speed.py (Flux VAE and text encoders at 1024x1024). Every row is
# appended to RESULTS.
#   bash bench/run_all.sh
# One command may have to fit a time limit: run it in parts with these variables, e.g.
#   PARTS=setup MODELS=flux bash bench/run_all.sh; PARTS=step MODELS=flux FLUX_RES=1024 bash bench/run_all.sh
#   MODELS     models to set up and measure (default "flux ltx-video hunyuan-video")
#   PARTS      what to do (default "setup step fast cache"); "fast": our engine rows with the speed
#              options of docs/benchmarks.md ("Fast settings": compile, cuDNN attention, float8
#              products, larger batches), beside the plain loop's rows of "step"
#   FLUX_RES   Flux resolutions (default "1024 512")
#   CKPT       activation checkpointing of the Flux and LTX-Video rows: off, on, both or selective, or
#              several of them, e.g. "off selective" (default both);
#   HUNYUAN_CKPT  the same for the HunyuanVideo rows (default on; without, it needs more than 80 GB)
#   MODES      step.py rows (default "engine layers diffusers")
#   FULL=1     also full fine-tuning rows (Flux 1024x1024, checkpointing on)
#   STEP_ARGS  more step.py arguments, e.g. "--steps 3 --warmup 1"
#   WORK       where the models go (default /tmp/bench; about 60 GB for all three)
#   RESULTS    the rows' file (default docs/results/<date>-<gpu>.jsonl)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/bench}
MODELS=${MODELS:-flux ltx-video hunyuan-video}
PARTS=${PARTS:-setup step fast cache}
FLUX_RES=${FLUX_RES:-1024 512}
CKPT=${CKPT:-both}
MODES=${MODES:-engine layers diffusers}
STEP_ARGS=${STEP_ARGS:-}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
gpu=$(python3 -c "import re, torch; n = torch.cuda.get_device_name().lower().removeprefix('nvidia '); print(re.sub('[^a-z0-9]+', '-', n))")
RESULTS=${RESULTS:-docs/results/$(date +%F)-$gpu.jsonl}
mkdir -p "$WORK/models" "$(dirname "$RESULTS")"

has() { [[ " $1 " == *" $2 "* ]]; }

if has "$PARTS" setup; then
  for model in $MODELS; do
    # The marker is written last: a folder that a stopped run left half-written is made again.
    [ -f "$WORK/models/$model/.complete" ] && continue
    rm -rf "${WORK:?}/models/$model"
    if [ "$model" = flux ]; then
      python3 bench/make_full_size_flux.py "$WORK/models"
    else
      python3 bench/make_full_size_video.py "$WORK/models" --only "$model"
    fi
    touch "$WORK/models/$model/.complete"
  done
fi

if has "$PARTS" step; then
  for model in $MODELS; do
    step=(python3 bench/step.py "$WORK/models/$model" --model "$model" --mode $MODES --json "$RESULTS" $STEP_ARGS)
    case $model in
      flux)
        "${step[@]}" --resolution $FLUX_RES --checkpointing $CKPT
        if [ "${FULL:-0}" = 1 ]; then "${step[@]}" --resolution 1024 --checkpointing on --full; fi ;;
      ltx-video) "${step[@]}" --resolution 768x512 --frames 49 --checkpointing $CKPT ;;
      hunyuan-video) "${step[@]}" --resolution 512x512 --frames 33 --checkpointing ${HUNYUAN_CKPT:-on} ;;
      *) echo "unknown model: $model" >&2; exit 2 ;;
    esac
  done
fi

if has "$PARTS" fast; then
  for model in $MODELS; do
    fast=(python3 bench/step.py "$WORK/models/$model" --model "$model" --mode engine --compile
          --attention _native_cudnn --json "$RESULTS" $STEP_ARGS)
    case $model in
      flux)
        for res in $FLUX_RES; do
          if [ "$res" = 1024 ]; then
            "${fast[@]}" --resolution 1024 --checkpointing off on
            # Within 30 GiB (and within 24 GB with full checkpointing): float8 weights and products.
            "${fast[@]}" --resolution 1024 --checkpointing selective on --float8 matmul
          else
            "${fast[@]}" --resolution "$res" --checkpointing off --batch 4
          fi
        done ;;
      ltx-video) "${fast[@]}" --resolution 768x512 --frames 49 --checkpointing off --batch 8 ;;
      hunyuan-video) "${fast[@]}" --resolution 512x512 --frames 33 --checkpointing selective on ;;
    esac
  done
fi

if has "$PARTS" cache; then
  python3 bench/cache_speed.py --resolution 1024 --batch 1 4 --json "$RESULTS"
fi
echo "rows appended to $RESULTS"
