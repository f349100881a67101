#!/usr/bin/env bash
# One GPU check, sized for a short stay on a GPU machine (about 7 minutes of wall time).
#
# Why a script: device time is scarce and each machine start costs minutes, so everything the
# GPU must show runs in one prepared command, each stage under its own timeout, each writing
# its JSON under $OUT as soon as it has numbers (a stage cut short still returns what it had).
#
# Expects: the device image's python3 with torch + CUDA, the repo as the working directory,
# wheels of diffusers (and its missing pure-python deps) in .whl/ (carry=[".whl"]).
# The project is not pip-installed there (its pin wants a newer torch): PYTHONPATH=. instead.
#
# Stages:
#   1. nvidia-smi, torch version
#   2. the GPU tests: tests/test_cuda.py (CUDA graphs equal uncaptured runs for fora, taylor,
#      taylor-lite and specdiff; at most one host sync per call)
#   3. scale bench, SD3-medium shape (24 layers x 1536, 24 heads x 64), 1024^2 = 4096 image
#      tokens + 333 text tokens, bf16, CFG batch 2, Inductor, CUDA graphs off (specdiff cr 0.8)
#   4. the same with CUDA graphs: Inductor's cudagraph trees for plain, SpecDiffConfig(cudagraphs=True)
#      for our variants
#   taylor, taylor-cg (only when named in STAGES): the scale bench's taylor kinds (the default policy:
#      record and forecast steps, lite and per-branch) at the same shape, CUDA graphs off / on;
#      e.g. STAGES="machine taylor taylor-cg"
#   profile (only when named in STAGES): examples/profile_steps.py at the same shape: per-kind wall
#      time, GPU kernel time by kernel and by class, and a 2-token partial step (the fixed cost)
# Environment knobs: STAGES (default "machine tests scale cg"; add "profile", "taylor", "taylor-cg"),
# TEST_TIMEOUT, SCALE_TIMEOUT, CG_TIMEOUT, PROFILE_TIMEOUT, TAYLOR_TIMEOUT, TAYLOR_CG_TIMEOUT (seconds),
# SCALE_ARGS (extra args for stages 3-4 and the taylor stages,
# e.g. "--layers 1 --resolution 256" for a smoke test on CPU with DEVICE=cpu), PROFILE_ARGS.
# The Inductor cache is packed into $OUT/inductor_cache.tgz (when small enough) so a later run on a
# fresh machine can carry it back (CACHE_TGZ=path) and skip most of the compile.
set -u
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
SCALE_ARGS=${SCALE_ARGS:-}
STAGES=${STAGES:-machine tests scale cg}
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor_cache}
has() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }
if [ -n "${CACHE_TGZ:-}" ] && [ -f "$CACHE_TGZ" ]; then
  mkdir -p "$TORCHINDUCTOR_CACHE_DIR" && tar -xzf "$CACHE_TGZ" -C "$TORCHINDUCTOR_CACHE_DIR" && echo "inductor cache restored"
fi

if ls .whl/*.whl >/dev/null 2>&1 && [ "${SKIP_WHEELS:-0}" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PY:-python3}

if has machine; then
echo "== stage 1: machine"
nvidia-smi 2>&1 | head -15 || true
$PY -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
fi

if has profile; then
echo "== stage profile: per-kind GPU kernel time, SD3-medium shape"
timeout "${PROFILE_TIMEOUT:-300}" $PY examples/profile_steps.py --family sd3-medium --resolution 1024 --layers 24 \
  --width 1536 --text-tokens 333 --batch 2 --dtype "$DTYPE" --device "$DEVICE" --threads 8 --ratio 0.8 --fixed --graphs \
  --repeats 10 --json "$OUT/profile_sd3_medium.json" ${PROFILE_ARGS:-} 2>&1 | grep -v "kept in float32"
echo "stage profile exit ${PIPESTATUS[0]}"
fi

echo "== stage 2: GPU tests"
if [ "$DEVICE" = cuda ] && has tests; then
  timeout "${TEST_TIMEOUT:-170}" $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -25
  echo "stage 2 exit ${PIPESTATUS[0]}"
fi

if has scale; then
echo "== stage 3: scale bench, SD3-medium shape, cudagraphs off"
timeout "${SCALE_TIMEOUT:-200}" $PY -m specdiff_fx scale --family sd3-medium --resolution 1024 --batch 2 \
  --dtype "$DTYPE" --device "$DEVICE" --threads 8 --repeats 10 --calls 3 --warmup 3 --ratios 0.8 \
  --policies specdiff --no-draft --no-memory --out "$OUT/scale_sd3_medium.json" --plot "" $SCALE_ARGS 2>&1 | grep -v "kept in float32"
echo "stage 3 exit ${PIPESTATUS[0]}"
fi

if has cg; then
echo "== stage 4: scale bench, cudagraphs on (Inductor's for plain, ours for the variants)"
timeout "${CG_TIMEOUT:-170}" $PY -m specdiff_fx scale --family sd3-medium --resolution 1024 --batch 2 \
  --dtype "$DTYPE" --device "$DEVICE" --threads 8 --repeats 10 --calls 3 --warmup 3 --ratios 0.8 \
  --policies specdiff --no-draft --no-memory --cudagraphs --out "$OUT/scale_sd3_medium_cudagraphs.json" --plot "" $SCALE_ARGS 2>&1 \
  | grep -v "kept in float32"
echo "stage 4 exit ${PIPESTATUS[0]}"
fi

# taylor: the default policy; a cold compile is plain + two record graphs (model-sized) + two forecast graphs
if has taylor; then
echo "== stage taylor: scale bench, taylor record/forecast (lite and per branch), cudagraphs off"
timeout "${TAYLOR_TIMEOUT:-240}" $PY -m specdiff_fx scale --family sd3-medium --resolution 1024 --batch 2 \
  --dtype "$DTYPE" --device "$DEVICE" --threads 8 --repeats 10 --calls 3 --warmup 3 --policies taylor \
  --no-memory --out "$OUT/scale_sd3_medium_taylor.json" --plot "" $SCALE_ARGS 2>&1 | grep -v "kept in float32"
echo "stage taylor exit ${PIPESTATUS[0]}"
fi

if has taylor-cg; then
echo "== stage taylor-cg: the same with CUDA graphs"
timeout "${TAYLOR_CG_TIMEOUT:-240}" $PY -m specdiff_fx scale --family sd3-medium --resolution 1024 --batch 2 \
  --dtype "$DTYPE" --device "$DEVICE" --threads 8 --repeats 10 --calls 3 --warmup 3 --policies taylor \
  --no-memory --cudagraphs --out "$OUT/scale_sd3_medium_taylor_cudagraphs.json" --plot "" $SCALE_ARGS 2>&1 \
  | grep -v "kept in float32"
echo "stage taylor-cg exit ${PIPESTATUS[0]}"
fi

size=$(du -sm "$TORCHINDUCTOR_CACHE_DIR" 2>/dev/null | cut -f1)
if [ -n "$size" ] && [ "$size" -lt 150 ]; then
  tar -czf "$OUT/inductor_cache.tgz" -C "$TORCHINDUCTOR_CACHE_DIR" . && ls -la "$OUT/inductor_cache.tgz"
fi
