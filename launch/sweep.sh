#!/usr/bin/env bash
# sweep.sh: run a sweep (`python -m pixart_jax.sweep`, trials from the config file's get_sweep) on Cloud TPU.
#
# SPREAD=0 (default): the trials one after another on one slice, NAME (made by create.sh, set up by setup.sh):
#   run.sh starts `python -m pixart_jax.sweep --config CONFIG --workdir WORKDIR [--trials TRIALS] ARGS...` on
#   every worker. Rerun the same line after a preemption: finished trials are skipped, the interrupted one resumes
#   from its checkpoints.
# SPREAD=1: one queued resource per trial, named NAME-<index>. First every queued resource is requested
#   (create.sh QUEUED=1 with ACCELERATOR, MODE, RUNTIME); then, trial by trial, the script waits for its resource
#   to be ACTIVE, runs setup.sh on it (with SETUP_ARGS) and starts `... --trials <index>` there with run.sh
#   (RUN_NAME-<index>). All trials write into WORKDIR; when they are done, the comparison (sweep.csv, sweep.png) is
#   written by `python -m pixart_jax.sweep --config CONFIG --workdir WORKDIR --report_only` from anywhere.
#   Delete the machines with launch/teardown.sh NAME=NAME-<index> QUEUED=1.
#
# Usage: launch/sweep.sh NAME=... ZONE=... WORKDIR=gs://... CONFIG=configs/FILE.py[:ARG] [KEY=VALUE ...] \
#            [-- MORE SWEEP ARGS]
#
#   NAME, ZONE, PROJECT   the TPU (SPREAD=1: the prefix of the per-trial queued resources)
#   WORKDIR      gs:// directory of the sweep (required): one folder per trial, sweep.csv, sweep.png
#   CONFIG       the config file with get_sweep, relative to the code directory on the workers (required)
#   TRIALS       trial indices, comma separated (SPREAD=1: required, one machine each; SPREAD=0: default all)
#   SPREAD       0 (default): one slice, trials in turn | 1: one queued resource per trial
#   ACCELERATOR  SPREAD=1: the accelerator type of each trial's machine (required), e.g. v5p-64
#   MODE         SPREAD=1: on-demand (default) | spot | reserved | best-effort
#   RUNTIME      SPREAD=1: TPU software version (default: create.sh's for the chip)
#   SETUP_ARGS   SPREAD=1: more KEY=VALUE words for setup.sh, space separated, e.g. MOUNT_BUCKET=my-bucket
#   RUN_NAME     name of the run on the workers (default sweep-YYYYmmdd-HHMMSS; SPREAD=1 adds -<index>)
#   DRY_RUN      1: print the gcloud commands and exit
# Words after -- are passed to pixart_jax.sweep, e.g. --config.data.dir=gs://BUCKET/data --config.steps=2000.
#
# Examples:
#   # the 512 px recipe's lr x warmup sweep, trial after trial on one v5p-64 slice
#   launch/sweep.sh NAME=pixart-v5p ZONE=us-east5-a WORKDIR=gs://my-bucket/sweeps/s512 \
#     CONFIG=configs/pixart_sigma_512_ms.py -- --config.data.dir=gs://my-bucket/data512 --config.steps=2000
#   # the same 6 trials at once, one spot v5p-64 queued resource each
#   launch/sweep.sh NAME=pixart-sw ZONE=us-east5-a WORKDIR=gs://my-bucket/sweeps/s512 SPREAD=1 TRIALS=0,1,2,3,4,5 \
#     ACCELERATOR=v5p-64 MODE=spot CONFIG=configs/pixart_sigma_512_ms.py -- --config.data.dir=gs://my-bucket/data512
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NAME=""
WORKDIR=""
CONFIG=""
TRIALS=""
SPREAD=0
ACCELERATOR=""
MODE="on-demand"
RUNTIME=""
SETUP_ARGS=""
RUN_NAME="sweep-$(date +%Y%m%d-%H%M%S)"
launch_parse "NAME WORKDIR CONFIG TRIALS SPREAD ACCELERATOR MODE RUNTIME SETUP_ARGS RUN_NAME" 1 "$@"

launch_require NAME ZONE WORKDIR CONFIG
launch_check_bool SPREAD
WORKDIR="${WORKDIR%/}"
launch_check_regex WORKDIR '^gs://[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9](/.*)?$' \
  "a gs://BUCKET/... path: every machine of the sweep must see the same sweep directory"
launch_check_regex CONFIG '^[A-Za-z0-9_][A-Za-z0-9_./-]*\.py(:[^[:space:]]*)?$' \
  "a config file path relative to the code directory, FILE.py[:ARG]"
launch_check_regex RUN_NAME '^[A-Za-z0-9_-]+$' "a run name (letters, digits, '_' and '-')"
if [[ -n $TRIALS ]]; then
  launch_check_regex TRIALS '^[0-9]+(,[0-9]+)*$' "a comma list of trial indices such as 0,1,2"
fi
if [[ $SPREAD == 1 ]]; then
  [[ -n $TRIALS ]] || launch_die "SPREAD=1 needs TRIALS=0,1,... (one queued resource per trial)"
  launch_require ACCELERATOR
  launch_check_regex NAME '^[a-z]([-a-z0-9]{0,55}[a-z0-9])?$' \
    "a TPU name prefix of at most 57 characters (each trial's machine is NAME-<index>)"
else
  for key in ACCELERATOR RUNTIME SETUP_ARGS; do
    [[ -z ${!key} ]] || launch_die "$key is for SPREAD=1 (SPREAD=0 runs on the existing slice NAME)"
  done
fi
launch_check_common

where=(ZONE="$ZONE" DRY_RUN="$DRY_RUN")
[[ -n $PROJECT ]] && where+=(PROJECT="$PROJECT")
sweep_cmd=(python -m pixart_jax.sweep --config "$CONFIG" --workdir "$WORKDIR")
extra=(${LAUNCH_REST[@]+"${LAUNCH_REST[@]}"})

if [[ $SPREAD == 0 ]]; then
  trials=()
  [[ -n $TRIALS ]] && trials=(--trials "$TRIALS")
  "$LAUNCH_DIR/run.sh" NAME="$NAME" "${where[@]}" WORKDIR="$WORKDIR" RUN_NAME="$RUN_NAME" -- \
    "${sweep_cmd[@]}" ${trials[@]+"${trials[@]}"} ${extra[@]+"${extra[@]}"}
  launch_info "follow it with: launch/logs.sh NAME=$NAME ZONE=$ZONE RUN=$RUN_NAME"
  exit 0
fi

IFS=, read -r -a indices <<<"$TRIALS"
create_extra=()
[[ -n $RUNTIME ]] && create_extra+=(RUNTIME="$RUNTIME")
read -r -a setup_extra <<<"$SETUP_ARGS"
for i in "${indices[@]}"; do
  "$LAUNCH_DIR/create.sh" NAME="$NAME-$i" "${where[@]}" ACCELERATOR="$ACCELERATOR" MODE="$MODE" QUEUED=1 \
    ${create_extra[@]+"${create_extra[@]}"}
done
launch_where
for i in "${indices[@]}"; do
  describe=(gcloud compute tpus queued-resources describe "$NAME-$i" "${LAUNCH_WHERE[@]}" --format "value(state.state)")
  launch_info "trial $i: waiting for $NAME-$i to become ACTIVE (polling every 30 s):"
  launch_print "${describe[@]}"
  while [[ $DRY_RUN != 1 ]]; do
    state="$("${describe[@]}")"
    launch_info "queued resource $NAME-$i: $state"
    case "$state" in
      ACTIVE) break ;;
      FAILED | SUSPENDED) launch_die "queued resource $NAME-$i is $state (trial $i): see $(launch_print "${describe[@]}")" ;;
    esac
    sleep 30
  done
  "$LAUNCH_DIR/setup.sh" NAME="$NAME-$i" "${where[@]}" ${setup_extra[@]+"${setup_extra[@]}"}
  "$LAUNCH_DIR/run.sh" NAME="$NAME-$i" "${where[@]}" WORKDIR="$WORKDIR" RUN_NAME="$RUN_NAME-$i" -- \
    "${sweep_cmd[@]}" --trials "$i" ${extra[@]+"${extra[@]}"}
done
launch_info "all ${#indices[@]} trials started; when they are done: python -m pixart_jax.sweep --config $CONFIG --workdir $WORKDIR --report_only"
launch_info "then delete each machine: launch/teardown.sh NAME=$NAME-<index> ZONE=$ZONE QUEUED=1"
