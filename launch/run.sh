#!/usr/bin/env bash
# run.sh: start a command on every worker of a TPU VM / pod slice, detached, with its logs on disk.
#
# Every worker gets ~/pixart_runs/RUN_NAME/job.sh (the command with the environment below) and starts
# it in a tmux session (or with nohup), so the run survives ssh disconnects; each worker logs to
# ~/pixart_runs/RUN_NAME/<hostname>.log, writes <hostname>.exit at the end and copies its log to
# WORKDIR/logs/RUN_NAME/. Follow it with launch/logs.sh. The environment of the command:
#   LIBTPU_INIT_ARGS           the XLA/libtpu flags kept in this script (LIBTPU_FLAGS below): async
#                              collective fusion and compute/collective overlap for FSDP all-gathers and
#                              reduce-scatters, as MaxText and MaxDiffusion set them, plus LIBTPU_EXTRA
#   JAX_COMPILATION_CACHE_DIR  a persistent compilation cache on GCS (COMPILE_CACHE), so a restart after
#                              a preemption does not compile again
#   WORKDIR                    the GCS workdir of the run
# A `python -m pixart_jax.train` (or pixart-train) command without --workdir gets --workdir=WORKDIR.
# Rerunning with the same WORKDIR resumes training from its last checkpoint.
#
# Usage: launch/run.sh NAME=... ZONE=... WORKDIR=gs://... [KEY=VALUE ...] -- COMMAND [ARGS...]
#    or: launch/run.sh NAME=... ZONE=... WORKDIR=gs://... CMD='COMMAND ARGS...' [KEY=VALUE ...]
#
#   NAME, ZONE, PROJECT   the TPU (ZONE/PROJECT default to $ZONE/$CLOUDSDK_COMPUTE_ZONE, $PROJECT/...)
#   WORKDIR        gs:// directory of the run (required): checkpoints, metrics, logs, compilation cache
#   CMD            the command as one string (instead of the words after --); run by bash on the workers
#   RUN_NAME       name of the run on the workers (default run-YYYYmmdd-HHMMSS); letters, digits, _ and -
#   WORKER         all (default) | N | N,M,...   (a pod slice needs all: every host runs the program)
#   LAUNCHER       tmux (default; falls back to nohup where tmux is missing) | nohup
#   LIBTPU_EXTRA   more libtpu flags, appended to LIBTPU_FLAGS, e.g. --xla_tpu_scoped_vmem_limit_kib=65536
#   LIBTPU_DEFAULTS  0: do not set LIBTPU_FLAGS, only LIBTPU_EXTRA (default 1)
#   COMPILE_CACHE  gs:// directory of the JAX compilation cache (default WORKDIR/jax_cache; share one
#                  across runs with e.g. gs://BUCKET/jax_cache); none: no persistent cache
#   REMOTE_DIR, VENV  as given to setup.sh (defaults pixart_jax, pixart_venv)
#   INTERNAL_IP    1: ssh through internal IPs (default 0)
#   DRY_RUN        1: print the gcloud command and exit
#
# Example: fine-tune PixArt-Sigma 1024-MS on a v5p-64 slice
#   launch/run.sh NAME=pixart-v5p ZONE=us-east5-a WORKDIR=gs://my-bucket/runs/sigma1024 \
#     RUN_NAME=sigma1024 -- python -m pixart_jax.train --config configs/pixart_sigma_1024_ms.py
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# XLA / libtpu flags for training on TPU, kept here next to the launch (never in Python).
LIBTPU_FLAGS=(
  # Overlap the FSDP all-gathers / reduce-scatters with compute (async collective fusion).
  --xla_tpu_enable_async_collective_fusion=true
  --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true
  --xla_tpu_enable_async_collective_fusion_multiple_steps=true
  --xla_tpu_overlap_compute_collective_tc=true
  --xla_enable_async_all_gather=true
  # Fuse and overlap the data-parallel gradient all-reduces.
  --xla_tpu_enable_data_parallel_all_reduce_opt=true
  --xla_tpu_data_parallel_opt_different_sized_ops=true
)

NAME=""
WORKDIR=""
CMD=""
RUN_NAME="run-$(date +%Y%m%d-%H%M%S)"
WORKER="all"
LAUNCHER="tmux"
LIBTPU_EXTRA=""
LIBTPU_DEFAULTS=1
COMPILE_CACHE=""
REMOTE_DIR="pixart_jax"
VENV="pixart_venv"
INTERNAL_IP=0
launch_parse "NAME WORKDIR CMD RUN_NAME WORKER LAUNCHER LIBTPU_EXTRA LIBTPU_DEFAULTS COMPILE_CACHE REMOTE_DIR VENV INTERNAL_IP" 1 "$@"

launch_require NAME ZONE WORKDIR
if [[ ${#LAUNCH_REST[@]} -gt 0 ]]; then
  [[ -z $CMD ]] || launch_die "give the command either as CMD=... or after --, not both"
  for word in "${LAUNCH_REST[@]}"; do CMD+="${CMD:+ }$(launch_quote "$word")"; done
fi
[[ -n $CMD ]] || launch_die "missing required argument CMD=... (or give the command after --)"
[[ $CMD != *PIXART_JOB_EOF* ]] || launch_die "CMD must not contain the word PIXART_JOB_EOF"
WORKDIR="${WORKDIR%/}"
launch_check_regex WORKDIR '^gs://[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9](/.*)?$' \
  "a gs://BUCKET/... path: every worker must see the same workdir, and a preempted VM loses its disk"
launch_check_regex RUN_NAME '^[A-Za-z0-9_-]+$' "a run name (letters, digits, '_' and '-')"
launch_check_worker
launch_check_choice LAUNCHER "tmux nohup"
launch_check_bool LIBTPU_DEFAULTS INTERNAL_IP
launch_check_remote_path REMOTE_DIR
launch_check_remote_path VENV
[[ -n $COMPILE_CACHE ]] || COMPILE_CACHE="$WORKDIR/jax_cache"
if [[ $COMPILE_CACHE != none ]]; then
  launch_check_regex COMPILE_CACHE '^gs://[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9](/.*)?$' "a gs://BUCKET/... path or none"
fi
launch_check_common

if [[ $CMD =~ (pixart_jax\.train|pixart-train)([[:space:]]|$) && $CMD != *--workdir* ]]; then
  CMD+=" --workdir=$(launch_quote "$WORKDIR")"
  launch_info "added --workdir=$WORKDIR to the training command"
fi

libtpu=()
[[ $LIBTPU_DEFAULTS == 1 ]] && libtpu=("${LIBTPU_FLAGS[@]}")
read -r -a extra_flags <<<"$LIBTPU_EXTRA"
libtpu+=(${extra_flags[@]+"${extra_flags[@]}"})
libtpu_value="${libtpu[*]+"${libtpu[*]}"}"
cache_line=":"
if [[ $COMPILE_CACHE != none ]]; then
  cache_line="export JAX_COMPILATION_CACHE_DIR=$(launch_quote "$COMPILE_CACHE")"
fi

job=""
launch_template job <<'EOF'
#!/usr/bin/env bash
# One worker's share of run @RUN@, written by launch/run.sh; its launcher appends the output to
# $RUN_DIR/<hostname>.log. Restart by hand with: bash "$0" >>"$RUN_DIR/$(hostname).log" 2>&1
set -uo pipefail
RUN_DIR="$HOME"/pixart_runs/@RUN@
host="$(hostname)"
LOG="$RUN_DIR/$host.log"
echo "$$" >"$RUN_DIR/$host.pid"
now() { date -u +%Y-%m-%dT%H:%M:%SZ; }
DIR=@DIR@
VENV=@VENV@
export LIBTPU_INIT_ARGS=@LIBTPU@
@CACHE@
export WORKDIR=@WORKDIR@
echo "[$(now)] $host: run @RUN@ starts: "@CMD_TEXT@
echo "[$(now)] $host: LIBTPU_INIT_ARGS=$LIBTPU_INIT_ARGS"
if cd "$DIR" && source "$VENV/bin/activate"; then
  (
    @CMD@
  )
  status=$?
else
  status=$?
  echo "cannot enter $DIR or activate $VENV: run launch/setup.sh first"
fi
echo "[$(now)] $host: run @RUN@ ended with exit status $status"
echo "$status" >"$RUN_DIR/$host.exit"
rm -f "$RUN_DIR/$host.pid"
timeout 300 gcloud storage cp "$LOG" @WORKDIR@/logs/@RUN@/"$host".log >/dev/null 2>&1 || true
exit "$status"
EOF
launch_fill job @RUN@ "$RUN_NAME" @LIBTPU@ "$(launch_quote "$libtpu_value")" @CACHE@ "$cache_line" \
  @WORKDIR@ "$(launch_quote "$WORKDIR")" @CMD_TEXT@ "$(launch_quote "$CMD")" \
  @DIR@ "$(launch_remote_path "$REMOTE_DIR")" @VENV@ "$(launch_remote_path "$VENV")" @CMD@ "$CMD"

remote=""
launch_template remote <<'EOF'
set -euo pipefail
RUNS="$HOME"/pixart_runs
RUN_DIR="$RUNS"/@RUN@
host="$(hostname)"
LOG="$RUN_DIR/$host.log"
mkdir -p "$RUN_DIR"
if [ -f "$RUN_DIR/$host.pid" ] && kill -0 "$(cat "$RUN_DIR/$host.pid")" 2>/dev/null; then
  echo "[$host] run @RUN@ is still going (pid $(cat "$RUN_DIR/$host.pid")): choose another RUN_NAME" >&2
  exit 1
fi
rm -f "$RUN_DIR/$host.exit"
cat >"$RUN_DIR/job.sh" <<'PIXART_JOB_EOF'
@JOB@
PIXART_JOB_EOF
ln -sfn "$RUN_DIR" "$RUNS/latest"
if [ @LAUNCHER@ = tmux ] && command -v tmux >/dev/null 2>&1; then
  # (the pane keeps the terminal open: tmux ends a session whose program closes it)
  tmux new-session -d -s pixart-@RUN@ "bash '$RUN_DIR/job.sh' 2>&1 | tee -a '$LOG'"
  how="tmux session pixart-@RUN@ (tmux attach -t pixart-@RUN@)"
else
  nohup setsid bash "$RUN_DIR/job.sh" >>"$LOG" 2>&1 </dev/null &
  how="background process (nohup)"
fi
echo "[$host] started run @RUN@ in a $how; log: $LOG"
EOF
launch_fill remote @RUN@ "$RUN_NAME" @LAUNCHER@ "$LAUNCHER" @JOB@ "$job"

ssh_flags=()
[[ $INTERNAL_IP == 1 ]] && ssh_flags=(--internal-ip)
launch_ssh "$WORKER" "$remote" ${ssh_flags[@]+"${ssh_flags[@]}"}
launch_info "follow it: launch/logs.sh NAME=$NAME ZONE=$ZONE RUN=$RUN_NAME"
