#!/usr/bin/env bash
# teardown.sh: delete a TPU VM, or a queued resource together with its TPU VM.
#
# Asks for confirmation unless YES=1 (with no terminal to ask on, it refuses without YES=1).
# Deleting the TPU deletes its disks, so everything not on GCS is lost: the run's checkpoints,
# metrics and logs (copied at the end of run.sh's job) live in WORKDIR on GCS and stay.
#
# Usage: launch/teardown.sh NAME=... ZONE=... [KEY=VALUE ...]
#
#   NAME, ZONE, PROJECT   the TPU (ZONE/PROJECT default to $ZONE/$CLOUDSDK_COMPUTE_ZONE, $PROJECT/...)
#   QUEUED       1: NAME is a queued resource (created with QUEUED=1); delete it and its node (--force)
#                0: NAME is a TPU VM (default)
#   YES          1: do not ask (also from the environment)
#   ASYNC        1: return without waiting for the deletion to finish (default 0)
#   DRY_RUN      1: print the gcloud command and exit (asks nothing, deletes nothing)
#
# Examples:
#   launch/teardown.sh NAME=pixart-v5e ZONE=us-west4-a
#   YES=1 launch/teardown.sh NAME=pixart-v5p ZONE=us-east5-a QUEUED=1
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NAME=""
QUEUED=0
YES="${YES:-0}"
ASYNC=0
launch_parse "NAME QUEUED YES ASYNC" 0 "$@"

launch_require NAME ZONE
launch_check_bool QUEUED YES ASYNC
launch_check_common

launch_where
async=()
[[ $ASYNC == 1 ]] && async=(--async)
if [[ $QUEUED == 1 ]]; then
  what="queued resource $NAME and its TPU VM in $ZONE"
  cmd=(gcloud compute tpus queued-resources delete "$NAME" "${LAUNCH_WHERE[@]}" --force --quiet)
else
  what="TPU VM $NAME in $ZONE"
  cmd=(gcloud compute tpus tpu-vm delete "$NAME" "${LAUNCH_WHERE[@]}" --quiet)
fi
cmd+=(${async[@]+"${async[@]}"})
if [[ $DRY_RUN == 1 ]]; then
  [[ $YES == 1 ]] || launch_info "would ask before deleting the $what (YES=1 skips that)"
else
  launch_confirm "delete the $what? Its disks go with it."
fi
run "${cmd[@]}"
