#!/usr/bin/env bash
# One prepared GPU benchmark run (one H100 / H200; JAX 0.11 CUDA, flax, optax, orbax, torch, transformers
# installed). Installs what the machine lacks (diffusers, grain, array_record, ml_collections) from the local wheel
# folder bench/gpu/wheels with no network, then runs bench/gpu/bench_gpu.py, which writes bench/results/gpu.md.
# Budget: under 8 minutes. See bench/gpu/README.md (how to build the wheel folder).
#
#   bench/gpu/run.sh                 # the real run; report in bench/results/gpu.md
#   bench/gpu/run.sh --dry           # toy sizes on the CPU (what the test suite runs); report in a temp file
#   bench/gpu/run.sh --out FILE ...  # any other bench_gpu.py flag is passed through
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS="${PIXART_GPU_WHEELS:-$HERE/wheels}"
DRY=0
for a in "$@"; do [[ "$a" == "--dry" ]] && DRY=1; done

missing=()
for spec in diffusers:diffusers grain:grain array_record:array_record ml_collections:ml_collections; do
  mod="${spec%%:*}"; pkg="${spec##*:}"
  "$PYTHON" -c "import $mod" 2>/dev/null || missing+=("$pkg")
done
if (( ${#missing[@]} )); then
  if [[ ! -d "$WHEELS" ]]; then
    echo "error: missing ${missing[*]} and no wheel folder $WHEELS; build it on a machine with network access" \
         "(bench/gpu/README.md) and copy it here" >&2
    exit 1
  fi
  echo "[run.sh] installing ${missing[*]} from $WHEELS (no network)"
  "$PYTHON" -m pip install --no-index --find-links "$WHEELS" "${missing[@]}"
fi

args=("$@")
if (( DRY )); then
  export JAX_PLATFORMS=cpu
  if [[ " $* " != *" --out "* ]]; then
    args+=(--out "${TMPDIR:-/tmp}/pixart_gpu_dry.md")
  fi
else
  "$PYTHON" -c "import jax, sys; d = jax.devices()[0]; print('[run.sh] device:', d.device_kind); \
sys.exit(0 if d.platform == 'gpu' else 'error: no GPU visible to JAX (' + d.platform + '); use --dry for the CPU')"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" XLA_PYTHON_CLIENT_PREALLOCATE=false HF_HUB_OFFLINE=1
exec "$PYTHON" "$ROOT/bench/gpu/bench_gpu.py" "${args[@]}"
