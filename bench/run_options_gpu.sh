#!/usr/bin/env bash
# One GPU, FLUX.1-dev-shaped random weights: what sampling costs beside diffusers' FluxPipeline
# (bench/sample_speed.py), and what EMA and DoRA add to a LoRA training step (bench/step.py, the
# engine row as train.py builds it, compiled as train.py compiles by default on a GPU).
# WHEELS=<folder of wheels> installs missing requirements with pip --target; W (default /tmp/w)
# holds the weights; OUT (default /tmp/out) gets the JSON rows. PARTS: any of setup sample step ckpt.
# ckpt: the compiled, checkpointed step through the engine and as a plain loop over the same layers
# (the engine's overhead), with this code and with an earlier copy of the trainer in BEFORE (e.g.
# `git archive fb2ccae | tar x -C .before`: DeepSpeed's checkpoint around each compiled block).
set -uo pipefail
if [ -n "${WHEELS:-}" ] && [ ! -d /tmp/site/deepspeed ]; then
  pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl >/dev/null 2>&1 || echo "wheel install had errors"
fi
[ -n "${WHEELS:-}" ] && export PYTHONPATH=/tmp/site
W=${W:-/tmp/w}; OUT=${OUT:-/tmp/out}; mkdir -p $W $OUT
for part in ${PARTS:-setup sample step}; do
  case $part in
  setup)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, deepspeed, diffusers, peft; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
    [ -d $W/flux ] || python3 bench/make_full_size_flux.py $W > $W/setup.log 2>&1 || tail -5 $W/setup.log
    ;;
  sample)  # 1024x1024, 28 steps, FLUX.1's embedded guidance; ours through the engine and FluxPipeline
    python3 bench/sample_speed.py $W --model flux --resolution 1024 --steps 28 --samples 2 --warmup 1 \
      --json $OUT/sample_speed.jsonl 2>&1 | grep -v "it/s\]\|s/it\]" | tail -8
    ;;
  step)  # LoRA r32 1024x1024, checkpointing: plain, EMA on the GPU, EMA in CPU memory, DoRA
    for extra in "" "--ema gpu" "--ema cpu" "--dora"; do
      python3 bench/step.py $W/flux --model flux --mode engine --resolution 1024 --checkpointing on --compile \
        --steps ${STEPS:-5} --no_flops $extra --json $OUT/step.jsonl 2>&1 | tail -2
    done
    ;;
  ckpt)  # LoRA r32 1024x1024, compiled, checkpointing: engine and plain loop, now and in $BEFORE
    for script in bench/step.py ${BEFORE:+$BEFORE/bench/step.py}; do
      python3 $script $W/flux --model flux --mode engine layers --resolution 1024 --checkpointing on --compile \
        --steps ${STEPS:-5} --no_flops --json $OUT/ckpt-$(basename $(dirname $(dirname $(realpath $script)))).jsonl 2>&1 | tail -3
    done
    ;;
  esac
done
