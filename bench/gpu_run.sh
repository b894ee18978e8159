#!/usr/bin/env bash
# The GPU benchmark: full-size Grounding DINO tiny + SAM ViT-H (random weights) on CUDA, 1920x1080, both paths,
# SAM in float32 and then in bfloat16 (the detector is float32 in both, as production runs it).
#
# Prepared for the device tool (no network there; its image has torch 2.11 + transformers 5.17 but not
# label-studio-sdk, rq, pydantic, segment-anything ...: see bench/wheels.txt). From the repo root, here:
#     bash bench/fetch_wheels.sh            # once, where PyPI is reachable: ~29 cp312 wheels, ~9 MB, into .whl/
# then one device call:
#     run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=600)
# and copy the JSON files it leaves in $OUT (files_at) into bench/results/.
#
# Expected time on an H100 (an estimate from forward times measured on one before and the CPU-side stage costs
# measured here, not a measurement): ~1 min to build and save the random models (3.2 GB), then ~2.5-4 min per
# SAM dtype (64 images x 2 paths x 2 passes: one without stage timers for images/s, one with them). Both runs
# share DEADLINE, so the float32 JSON comes back even if the bfloat16 run is cut short. N=32 halves the image work.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
N=${N:-64}
SIZE=${SIZE:-1920x1080}
OBJECTS=${OBJECTS:-5}
BATCH=${BATCH:-8}
SAM_IMAGE_BATCH=${SAM_IMAGE_BATCH:-1}   # images per SAM encoder forward on the batched path (SAM_IMAGE_BATCH)
SAM_SIZE=${SAM_SIZE:-vit_h}
DEADLINE=${DEADLINE:-570}    # seconds from the start: the runs stop in time for the device call's 600 s limit
MASKS=${MASKS:-ellipse}       # object-like masks for cleanup/RLE/JSON after SAM ran (see README); "model" keeps SAM's
DEVICE=${DEVICE:-cuda}    # DEVICE=cpu MODELS=tiny N=2 SIZE=320x240: a smoke test of this script without a GPU
MODELS=${MODELS:-full}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "no .whl/ carried: relying on the machine's packages"
  export PYTHONPATH=$PWD
fi

{
  nvidia-smi || true
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  lscpu | grep -E 'Model name|^CPU\(s\)'
} 2>&1 | tee "$OUT/env.txt"
python3 -c "import backend.jobs, backend.images.fetch, backend.pipeline.build, segment_anything, label_studio_sdk" \
  || { echo "imports failed: add the missing package to bench/wheels.txt and fetch again"; exit 1; }

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -oiE 'h100|h200|a100|l40s|l4' | head -1 | tr 'A-Z' 'a-z')
gpu=${gpu:-gpu}
# Low precision against float32 on CUDA (tests/unit/test_low_precision.py) and the batching/OOM-split tests, first:
# a minute at most, and the dtype the second benchmark run uses is only worth timing if it passes.
timeout 240 python3 -m pytest -q -p no:cacheprovider -rs tests/unit/test_low_precision.py tests/unit/test_batching_memory.py \
  2>&1 | tail -25 | tee "$OUT/equivalence.txt"

common=(--images "$N" --size "$SIZE" --objects "$OBJECTS" --models "$MODELS" --sam hf --sam-size "$SAM_SIZE" --device "$DEVICE"
        --batch "$BATCH" --sam-image-batch "$SAM_IMAGE_BATCH" --masks "$MASKS" --model-dir /tmp/bench-models --image-cache /tmp/bench-images)
status=0
for dtype in float32 bfloat16; do
  name="${gpu}_${MODELS}_${SAM_SIZE//_/}_sam-${dtype}"
  left=$((DEADLINE - SECONDS))
  [ "$left" -gt 60 ] || { echo "$dtype: skipped, ${left}s left"; status=124; continue; }
  timeout "$left" python3 bench/pipeline.py "${common[@]}" --sam-dtype "$dtype" --out "$OUT/$name.json" \
    2>&1 | grep -v -e 'Loading weights' -e 'Writing model shards' | tee "$OUT/$name.log"
  code=${PIPESTATUS[0]}
  [ "$code" -eq 0 ] || { echo "$name: exit $code"; status=$code; }
done
exit $status
