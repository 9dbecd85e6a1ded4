#!/usr/bin/env bash
# create.sh: create a Cloud TPU VM (single host or pod slice), directly or as a queued resource.
#
# Usage: launch/create.sh NAME=... ZONE=... ACCELERATOR=... [KEY=VALUE ...]
#
#   NAME         TPU name (required), e.g. pixart-v5e
#   ZONE         zone (required; defaults to $ZONE or $CLOUDSDK_COMPUTE_ZONE), e.g. us-west4-a
#   PROJECT      project (default: $PROJECT, $CLOUDSDK_CORE_PROJECT, else gcloud's own config)
#   ACCELERATOR  accelerator type (required): v5litepod-1|4|8|16..., v5p-8|16|...|64..., v6e-1|4|8|16...,
#                v4-8|16|32...; v5e-N is taken as v5litepod-N. Slices bigger than one host
#                (v5litepod/v6e > 8 chips, v5p/v4 > 8 cores) are pods: all later scripts run on every worker.
#   RUNTIME      TPU software version (default from the chip: v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5,
#                v5e v2-alpha-tpuv5-lite, v4/v3/v2 tpu-ubuntu2204-base)
#   MODE         on-demand (default) | spot | reserved | best-effort (queued resources only)
#   QUEUED       1: request a queued resource (waits in line for capacity; the way to get big slices)
#                0: create the TPU VM directly (default)
#   WAIT         1: with QUEUED=1, poll until the queued resource is ACTIVE (default 0)
#   VALID_UNTIL  with QUEUED=1, give up the request after this long, e.g. 6h (--valid-until-duration)
#   NETWORK, SUBNETWORK, LABELS   passed to gcloud as --network, --subnetwork, --labels
#   DRY_RUN      1: print the gcloud commands and exit (no gcloud needed)
#
# Examples:
#   # one v5e host with 8 chips on spot capacity
#   launch/create.sh NAME=pixart-v5e ZONE=us-west4-a ACCELERATOR=v5litepod-8 MODE=spot
#   # a v5p-64 pod slice (32 chips, 8 hosts) from a reservation, through a queued resource
#   launch/create.sh NAME=pixart-v5p ZONE=us-east5-a ACCELERATOR=v5p-64 QUEUED=1 MODE=reserved WAIT=1
#   # see the commands only
#   DRY_RUN=1 launch/create.sh NAME=pixart-v6e ZONE=us-east5-b ACCELERATOR=v6e-8 MODE=spot
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NAME=""
ACCELERATOR=""
RUNTIME=""
MODE="on-demand"
QUEUED=0
WAIT=0
VALID_UNTIL=""
NETWORK=""
SUBNETWORK=""
LABELS=""
launch_parse "NAME ACCELERATOR RUNTIME MODE QUEUED WAIT VALID_UNTIL NETWORK SUBNETWORK LABELS" 0 "$@"

launch_require NAME ZONE ACCELERATOR
launch_check_bool QUEUED WAIT
launch_check_choice MODE "on-demand spot reserved best-effort"
launch_check_regex ACCELERATOR '^[a-z0-9]+-[0-9]+$' "an accelerator type such as v5litepod-8 or v5p-64"
if [[ $ACCELERATOR == v5e-* ]]; then
  launch_info "ACCELERATOR=$ACCELERATOR: gcloud calls v5e slices v5litepod-N; using v5litepod-${ACCELERATOR#v5e-}"
  ACCELERATOR="v5litepod-${ACCELERATOR#v5e-}"
fi
if [[ -z $RUNTIME ]]; then
  case "$ACCELERATOR" in
    v6e-*) RUNTIME="v2-alpha-tpuv6e" ;;
    v5p-*) RUNTIME="v2-alpha-tpuv5" ;;
    v5litepod-*) RUNTIME="v2-alpha-tpuv5-lite" ;;
    v4-* | v3-* | v2-*) RUNTIME="tpu-ubuntu2204-base" ;;
    *) launch_die "no default runtime for ACCELERATOR=$ACCELERATOR: pass RUNTIME=..." ;;
  esac
fi
if [[ $MODE == best-effort && $QUEUED != 1 ]]; then
  launch_die "MODE=best-effort exists only for queued resources: add QUEUED=1"
fi
if [[ $QUEUED != 1 ]]; then
  [[ $WAIT == 0 ]] || launch_die "WAIT=1 needs QUEUED=1 (a direct create already waits)"
  [[ -z $VALID_UNTIL ]] || launch_die "VALID_UNTIL needs QUEUED=1"
fi
launch_check_common

launch_where
extra=()
[[ -n $NETWORK ]] && extra+=(--network "$NETWORK")
[[ -n $SUBNETWORK ]] && extra+=(--subnetwork "$SUBNETWORK")
[[ -n $LABELS ]] && extra+=(--labels "$LABELS")

if [[ $QUEUED == 1 ]]; then
  gcloud_cmd=(gcloud)
  # --best-effort is only offered by the alpha surface of gcloud.
  [[ $MODE == best-effort ]] && gcloud_cmd=(gcloud alpha)
  mode_flag=()
  [[ $MODE != on-demand ]] && mode_flag=("--$MODE")
  [[ -n $VALID_UNTIL ]] && extra+=(--valid-until-duration "$VALID_UNTIL")
  run "${gcloud_cmd[@]}" compute tpus queued-resources create "$NAME" --node-id "$NAME" \
    "${LAUNCH_WHERE[@]}" --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME" \
    ${mode_flag[@]+"${mode_flag[@]}"} ${extra[@]+"${extra[@]}"}
  describe=(gcloud compute tpus queued-resources describe "$NAME" "${LAUNCH_WHERE[@]}"
    --format "value(state.state)")
  if [[ $WAIT == 1 ]]; then
    launch_info "waiting for $NAME to become ACTIVE (polling every 30 s):"
    launch_print "${describe[@]}"
    while [[ $DRY_RUN != 1 ]]; do
      state="$("${describe[@]}")"
      launch_info "queued resource $NAME: $state"
      case "$state" in
        ACTIVE) break ;;
        FAILED | SUSPENDED) launch_die "queued resource $NAME is $state; see: gcloud compute tpus queued-resources describe $NAME --zone $ZONE" ;;
      esac
      sleep 30
    done
  else
    launch_info "queued: watch it with: $(launch_print "${describe[@]}")"
  fi
else
  mode_flag=()
  [[ $MODE == spot || $MODE == reserved ]] && mode_flag=("--$MODE")
  run gcloud compute tpus tpu-vm create "$NAME" "${LAUNCH_WHERE[@]}" \
    --accelerator-type "$ACCELERATOR" --version "$RUNTIME" \
    ${mode_flag[@]+"${mode_flag[@]}"} ${extra[@]+"${extra[@]}"}
fi
launch_info "next: launch/setup.sh NAME=$NAME ZONE=$ZONE"
