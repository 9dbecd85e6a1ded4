#!/usr/bin/env bash
# demo_sweep.sh: the smoke sweep of tests/test_sweep.py (configs/demo.py:smoke: 3 learning rates, 12 steps each
# over the demo's digits) run through the command line; its plot becomes docs/demo_sweep.png (README "Compare runs").
#
# Usage: scripts/demo_sweep.sh DEMO_WORKDIR [SWEEP_DIR]
#   DEMO_WORKDIR  a finished `python -m pixart_jax.demo` workdir: its data/ is read, never written
#   SWEEP_DIR     where the sweep runs (default: a new temporary folder); rerunning on it resumes / skips
#   PY            the Python to use (default: .venv/bin/python if present, else python3)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ $# -ge 1 && $# -le 2 ]] || { sed -n '2,9s/^# \{0,1\}//p' "$0"; exit 2; }
demo="$1"
[[ -f $demo/data/manifest.json ]] || { echo "error: $demo/data/manifest.json not found: not a demo workdir" >&2; exit 1; }
out="${2:-$(mktemp -d "${TMPDIR:-/tmp}/demo_sweep.XXXXXX")/sweep}"
py="${PY:-}"
if [[ -z $py ]]; then
  if [[ -x $root/.venv/bin/python ]]; then py="$root/.venv/bin/python"; else py=python3; fi
fi
cd "$root"
JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}" \
  "$py" -m pixart_jax.sweep --config configs/demo.py:smoke --workdir "$out" --config.data.dir "$demo/data"
cp "$out/sweep.png" docs/demo_sweep.png
echo "sweep: $out; plot copied to docs/demo_sweep.png"
cat "$out/sweep.csv"
