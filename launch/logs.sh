#!/usr/bin/env bash
# logs.sh: show or follow the log of a run started by launch/run.sh, from worker 0 or from all workers.
#
# Each worker logs to ~/pixart_runs/RUN/<hostname>.log; with several workers every line is prefixed
# with [hostname]. Ctrl-C stops following; the run goes on. At the end of a run the logs are also in
# WORKDIR/logs/RUN/ on GCS.
#
# Usage: launch/logs.sh NAME=... ZONE=... [KEY=VALUE ...]
#
#   NAME, ZONE, PROJECT   the TPU (ZONE/PROJECT default to $ZONE/$CLOUDSDK_COMPUTE_ZONE, $PROJECT/...)
#   RUN          run name given to run.sh (default latest: the last run started)
#   WORKER       0 (default) | all | N | N,M,...
#   FOLLOW       1: keep following (tail -F, default) | 0: print the last lines and the exit status
#   TAIL         how many lines to show first (default 100)
#   INTERNAL_IP  1: ssh through internal IPs (default 0)
#   DRY_RUN      1: print the gcloud command and exit
#
# Examples:
#   launch/logs.sh NAME=pixart-v5p ZONE=us-east5-a
#   launch/logs.sh NAME=pixart-v5p ZONE=us-east5-a RUN=sigma1024 WORKER=all FOLLOW=0 TAIL=20
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NAME=""
RUN="latest"
WORKER="0"
FOLLOW=1
TAIL=100
INTERNAL_IP=0
launch_parse "NAME RUN WORKER FOLLOW TAIL INTERNAL_IP" 0 "$@"

launch_require NAME ZONE RUN
launch_check_regex RUN '^[A-Za-z0-9_-]+$' "a run name (letters, digits, '_' and '-')"
launch_check_worker
launch_check_bool FOLLOW INTERNAL_IP
launch_check_regex TAIL '^[0-9]+$' "a number of lines"
launch_check_common

tail_cmd="tail -n $TAIL"
[[ $FOLLOW == 1 ]] && tail_cmd="tail -n $TAIL -F"
prefix=""
# shellcheck disable=SC2016  # expanded on the worker
[[ $WORKER == all || $WORKER == *,* ]] && prefix=' | sed -u "s/^/[$h] /"'
status_line=""
if [[ $FOLLOW == 0 ]]; then
  launch_template status_line <<'EOF'
if [ -f "$d/$h.exit" ]; then echo "[$h] exit status $(cat "$d/$h.exit")"; else echo "[$h] still running"; fi
EOF
fi
remote=""
launch_template remote <<'EOF'
d="$HOME"/pixart_runs/@RUN@; h="$(hostname)"
if [ ! -f "$d/$h.log" ]; then echo "[$h] no log $d/$h.log; runs here: $(ls "$HOME"/pixart_runs 2>/dev/null | tr '\n' ' ')" >&2; exit 1; fi
@TAIL@ "$d/$h.log"@PREFIX@
EOF
[[ -z $status_line ]] || remote+=$'\n'"$status_line"
launch_fill remote @RUN@ "$RUN" @TAIL@ "$tail_cmd" @PREFIX@ "$prefix"

ssh_flags=()
[[ $INTERNAL_IP == 1 ]] && ssh_flags=(--internal-ip)
launch_ssh "$WORKER" "$remote" ${ssh_flags[@]+"${ssh_flags[@]}"}
