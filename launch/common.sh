# shellcheck shell=bash
# Shared helpers for the launch/*.sh scripts. Source it; do not run it.
#
# Conventions every script follows:
#   * arguments are KEY=VALUE words; an unknown KEY, a word that is not KEY=VALUE, or a missing
#     required KEY is an error that names it;
#   * `-h` / `--help` prints the comment block at the top of the script (its usage header);
#   * every command that touches the cloud is printed (one shell-quoted, copy-pasteable command per
#     logical line, on stdout) before it runs; with DRY_RUN=1 it is only printed, so no gcloud is
#     needed on PATH and nothing is created, changed or deleted;
#   * ZONE and PROJECT default to the environment ($ZONE or $CLOUDSDK_COMPUTE_ZONE,
#     $PROJECT or $CLOUDSDK_CORE_PROJECT); DRY_RUN and YES may come from the environment too.
#     Every other KEY comes from the command line only.
# Messages for humans go to stderr, prefixed with [launch].
#
# Avoids bash-4-only features so that macOS's bash 3.2 can run it too (no associative arrays, empty
# arrays expanded as ${a[@]+"${a[@]}"}); tested with bash 5.

# (SC2034: these globals are read by the scripts that source this file.)
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034
LAUNCH_ROOT="$(cd "$LAUNCH_DIR/.." && pwd)"
LAUNCH_SCRIPT="${0##*/}"
# Words after `--` (only for scripts that accept a command), filled by launch_parse.
# shellcheck disable=SC2034
LAUNCH_REST=()

ZONE="${ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}"
PROJECT="${PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}"
DRY_RUN="${DRY_RUN:-0}"

launch_info() { printf '[launch] %s\n' "$*" >&2; }

launch_die() {
  printf '[launch] error: %s\n' "$*" >&2
  printf "[launch] run '%s --help' for usage\n" "$LAUNCH_SCRIPT" >&2
  exit 2
}

# Print the usage header: the leading comment block of the script (after the shebang).
launch_usage() {
  local file="$1" line started=0
  while IFS= read -r line || [[ -n "$line" ]]; do
    if [[ $started == 0 ]]; then
      started=1
      [[ $line == '#!'* ]] && continue
    fi
    [[ $line == '#'* ]] || break
    line="${line#\#}"
    printf '%s\n' "${line# }"
  done <"$file"
}

# launch_parse "KEY1 KEY2 ..." ACCEPTS_COMMAND "$@"
# Assigns each KEY=VALUE word to the variable KEY (which must be in the allowed list, to which
# ZONE PROJECT DRY_RUN are always added). With ACCEPTS_COMMAND=1 the words after `--` are kept in
# LAUNCH_REST; otherwise `--` is an error.
launch_parse() {
  local allowed=" $1 ZONE PROJECT DRY_RUN " accepts_command="$2" word key keys
  read -r -a keys <<<"$allowed"
  shift 2
  for word in "$@"; do
    case "$word" in
      --) break ;;
      -h | --help)
        launch_usage "$0"
        exit 0
        ;;
    esac
  done
  while [[ $# -gt 0 ]]; do
    word="$1"
    shift
    if [[ $word == "--" ]]; then
      [[ $accepts_command == 1 ]] || launch_die "unexpected '--': $LAUNCH_SCRIPT takes no command"
      # shellcheck disable=SC2034
      LAUNCH_REST=("$@")
      [[ $# -gt 0 ]] || launch_die "nothing after '--': give the command to run"
      return 0
    fi
    if [[ ! $word =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
      launch_die "expected KEY=VALUE, got '$word' (allowed keys:$(printf ' %s' "${keys[@]}"))"
    fi
    key="${word%%=*}"
    if [[ $allowed != *" $key "* ]]; then
      launch_die "unknown argument '$key' (allowed keys:$(printf ' %s' "${keys[@]}"))"
    fi
    printf -v "$key" '%s' "${word#*=}"
  done
}

# launch_require KEY... : die naming the first KEY whose value is empty.
launch_require() {
  local key
  for key in "$@"; do
    if [[ -z "${!key:-}" ]]; then
      case "$key" in
        ZONE) launch_die "missing required argument ZONE=... (or export ZONE / CLOUDSDK_COMPUTE_ZONE)" ;;
        *) launch_die "missing required argument $key=..." ;;
      esac
    fi
  done
}

# launch_check_bool KEY... : the value must be 0 or 1.
launch_check_bool() {
  local key
  for key in "$@"; do
    case "${!key}" in
      0 | 1) ;;
      *) launch_die "$key must be 0 or 1, got '${!key}'" ;;
    esac
  done
}

# launch_check_choice KEY "a b c"
launch_check_choice() {
  local key="$1" choices=" $2 " list
  read -r -a list <<<"$2"
  if [[ $choices != *" ${!key} "* ]]; then
    launch_die "$key must be one of:$(printf ' %s' "${list[@]}"); got '${!key}'"
  fi
}

# launch_check_regex KEY REGEX WHAT
launch_check_regex() {
  local key="$1" regex="$2" what="$3"
  if [[ ! ${!key} =~ $regex ]]; then
    launch_die "$key='${!key}' is not $what"
  fi
}

# Checks shared by every script that addresses one TPU (NAME, ZONE, PROJECT, DRY_RUN).
launch_check_common() {
  launch_require NAME ZONE
  launch_check_bool DRY_RUN
  launch_check_regex NAME '^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$' \
    "a valid TPU name (lowercase letters, digits and '-', starting with a letter, at most 63)"
  launch_check_regex ZONE '^[a-z]+-[a-z]+[0-9]+-[a-z0-9]+$' "a zone such as us-east5-a"
  if [[ -n $PROJECT ]]; then
    launch_check_regex PROJECT '^[a-z][-a-z0-9.:]{4,61}[a-z0-9]$' "a valid project id"
  fi
  if [[ $DRY_RUN != 1 ]] && ! command -v gcloud >/dev/null 2>&1; then
    launch_die "gcloud not found on PATH: install the Google Cloud CLI, or use DRY_RUN=1 to print the commands"
  fi
}

# A path on the workers: relative to $HOME or absolute, made of plain components (no '.', '..', '~').
launch_check_remote_path() {
  launch_check_regex "$1" '^/?[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$' \
    "a plain path (letters, digits, '_', '.', '-'; relative to \$HOME or absolute; no '..')"
}

# Validate a --worker value: all, N, or a comma list of N.
launch_check_worker() {
  launch_check_regex WORKER '^(all|[0-9]+(,[0-9]+)*)$' "all, a worker index, or a comma list of indices"
}

# Shell-quote one word so that the printed command can be pasted back into a shell.
launch_quote() {
  local s="$1" q="'"
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@,+%^-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//$q/$q\\$q$q}"
  fi
}

# Print a command as one copy-pasteable logical line on stdout.
launch_print() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(launch_quote "$word")"
  done
  printf '%s\n' "$out"
}

# run CMD ARGS... : print the command, then execute it unless DRY_RUN=1.
run() {
  launch_print "$@"
  [[ $DRY_RUN == 1 ]] && return 0
  "$@"
}

# The location flags of every `gcloud compute tpus ...` command: --zone Z [--project P].
launch_where() {
  LAUNCH_WHERE=(--zone "$ZONE")
  if [[ -n $PROJECT ]]; then LAUNCH_WHERE+=(--project "$PROJECT"); fi
}

# launch_ssh WORKER REMOTE_COMMAND [EXTRA_GCLOUD_FLAGS...]
# Run REMOTE_COMMAND (a bash script, run by the login shell of each worker) on the workers.
launch_ssh() {
  local worker="$1" remote="$2"
  shift 2
  launch_where
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LAUNCH_WHERE[@]}" --worker="$worker" \
    ${@+"$@"} --command "$remote"
}

# A remote path: absolute paths stay, relative ones are taken under the remote $HOME.
# Prints a bash expression (with $HOME unexpanded) that the remote shell expands.
launch_remote_path() {
  local path="$1"
  if [[ $path == /* ]]; then
    launch_quote "$path"
  else
    # shellcheck disable=SC2016  # $HOME is for the worker's shell to expand
    printf '"$HOME"/%s' "$(launch_quote "$path")"
  fi
}

# launch_template VAR <<'EOF' ... EOF : read a here-document into VAR (without its last newline).
launch_template() {
  IFS= read -r -d '' "$1" || true
  printf -v "$1" '%s' "${!1%$'\n'}"
}

# launch_fill VAR @KEY@ VALUE ... : replace each @KEY@ placeholder in VAR by its VALUE.
# (Plain prefix/suffix cuts, not ${v//p/r}: bash 5.2 gives '&' a meaning in replacements.)
launch_fill() {
  local var="$1" text="${!1}" out
  shift
  while [[ $# -ge 2 ]]; do
    out=""
    while [[ $text == *"$1"* ]]; do
      out+="${text%%"$1"*}$2"
      text="${text#*"$1"}"
    done
    text="$out$text"
    shift 2
  done
  printf -v "$var" '%s' "$text"
}

# Ask before doing something destructive; YES=1 answers yes. Without a terminal, refuse.
launch_confirm() {
  local question="$1" answer
  [[ ${YES:-0} == 1 ]] && return 0
  if [[ ! -t 0 ]]; then
    launch_die "refusing to go on without confirmation ($question): pass YES=1"
  fi
  read -r -p "$question [y/N] " answer
  case "$answer" in
    y | Y | yes | YES) return 0 ;;
    *)
      launch_info "aborted"
      exit 1
      ;;
  esac
}
