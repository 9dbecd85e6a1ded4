#!/usr/bin/env bash
# setup.sh: put the code and a Python environment on every worker of a TPU VM or pod slice.
#
# Idempotent: run it again after every code change. On each worker it
#   1. brings the code to REMOTE_DIR: a copy of this local checkout (SOURCE=copy: tracked and untracked,
#      non-ignored files, sent with `tpu-vm scp --worker=all`) or `git clone/fetch REPO_URL` at REF;
#   2. installs uv if missing and creates the venv VENV with Python PYTHON only if it does not exist
#      (jax needs Python >= 3.11; the TPU images ship 3.10, so uv fetches a managed Python);
#   3. runs `pip install -e .[EXTRAS] PACKAGES` only when setup.py, EXTRAS or PACKAGES changed since the
#      last install (a stamp file in the venv), or when FORCE=1;
#   4. with MOUNT_BUCKET, installs Cloud Storage FUSE if missing and mounts the bucket at MOUNT_POINT
#      (same path on every worker: the data pipeline and `prepare` read and write plain paths);
#   5. with CHECK=1, prints what `python -c "import jax; print(jax.device_count())"` sees. On a pod this
#      check needs every worker (WORKER=all), as JAX connects all hosts before it answers.
#
# Usage: launch/setup.sh NAME=... ZONE=... [KEY=VALUE ...]
#
#   NAME, ZONE, PROJECT   the TPU (ZONE/PROJECT default to $ZONE/$CLOUDSDK_COMPUTE_ZONE, $PROJECT/...)
#   WORKER       all (default) | N | N,M,...
#   SOURCE       copy (default without REPO_URL) | git (default with REPO_URL)
#   REPO_URL     git URL to clone on the workers (SOURCE=git)
#   REF          branch, tag or commit to check out (SOURCE=git; default main)
#   REMOTE_DIR   code directory on the workers, relative to $HOME unless absolute (default pixart_jax)
#   VENV         venv directory on the workers (default pixart_venv)
#   PYTHON       Python version for the venv (default 3.12)
#   EXTRAS       setup.py extras to install (default tpu)
#   PACKAGES     extra pip requirements, space separated (default gcsfs: gs:// paths through fsspec)
#   FORCE        1: reinstall the dependencies even when the stamp says they are current (default 0)
#   CHECK        1: print the JAX device count on every worker at the end (default 1)
#   MOUNT_BUCKET bucket name (no gs://) to mount with gcsfuse on every worker (default: none)
#   MOUNT_POINT  where to mount it, relative to $HOME unless absolute (default gcs)
#   INTERNAL_IP  1: ssh/scp through internal IPs (from a VM in the same VPC) (default 0)
#   DRY_RUN      1: print the gcloud commands and exit
#
# Examples:
#   launch/setup.sh NAME=pixart-v5p ZONE=us-east5-a MOUNT_BUCKET=my-bucket
#   launch/setup.sh NAME=pixart-v5p ZONE=us-east5-a SOURCE=git REPO_URL=https://github.com/me/pixart_jax REF=v0.1.0
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NAME=""
WORKER="all"
SOURCE=""
REPO_URL=""
REF="main"
REMOTE_DIR="pixart_jax"
VENV="pixart_venv"
PYTHON="3.12"
EXTRAS="tpu"
PACKAGES="gcsfs"
FORCE=0
CHECK=1
MOUNT_BUCKET=""
MOUNT_POINT="gcs"
INTERNAL_IP=0
launch_parse "NAME WORKER SOURCE REPO_URL REF REMOTE_DIR VENV PYTHON EXTRAS PACKAGES FORCE CHECK MOUNT_BUCKET MOUNT_POINT INTERNAL_IP" 0 "$@"

if [[ -z $SOURCE ]]; then
  if [[ -n $REPO_URL ]]; then SOURCE=git; else SOURCE=copy; fi
fi
launch_require NAME ZONE
launch_check_choice SOURCE "copy git"
[[ $SOURCE == git ]] && launch_require REPO_URL REF
[[ $SOURCE == copy && -n $REPO_URL ]] && launch_die "REPO_URL is for SOURCE=git; SOURCE=copy sends this checkout"
launch_check_bool FORCE CHECK INTERNAL_IP
launch_check_worker
launch_check_regex PYTHON '^3\.[0-9]+$' "a Python version such as 3.12"
launch_check_regex EXTRAS '^[A-Za-z0-9_,-]*$' "a comma list of setup.py extras"
launch_check_remote_path REMOTE_DIR
launch_check_remote_path VENV
launch_check_remote_path MOUNT_POINT
if [[ -n $MOUNT_BUCKET ]]; then
  launch_check_regex MOUNT_BUCKET '^[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9]$' "a bucket name (without gs://)"
fi
[[ $REMOTE_DIR != "$VENV" ]] || launch_die "REMOTE_DIR and VENV must differ"
launch_check_common

ssh_flags=()
[[ $INTERNAL_IP == 1 ]] && ssh_flags=(--internal-ip)
dir="$(launch_remote_path "$REMOTE_DIR")"
venv="$(launch_remote_path "$VENV")"
tarball_remote=".pixart_jax_src.tar.gz"
code_step=""
env_step=""
mount_step=""
check_step=""
remote=""

# --- step 1, the code ---
if [[ $SOURCE == copy ]]; then
  tarball="${TMPDIR:-/tmp}/pixart_jax-$NAME.tar.gz"
  launch_info "packing $LAUNCH_ROOT (tracked + untracked files that git does not ignore) into $tarball"
  if [[ $DRY_RUN != 1 ]]; then
    git -C "$LAUNCH_ROOT" rev-parse --git-dir >/dev/null 2>&1 ||
      launch_die "SOURCE=copy sends a git checkout, and $LAUNCH_ROOT is not one (or git is missing): use SOURCE=git REPO_URL=..."
    git -C "$LAUNCH_ROOT" ls-files -z -co --exclude-standard |
      while IFS= read -r -d '' f; do
        if [[ -e "$LAUNCH_ROOT/$f" ]]; then printf '%s\0' "$f"; fi
      done |
      tar -C "$LAUNCH_ROOT" --null -T - -czf "$tarball"
  fi
  launch_where
  run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:$tarball_remote" "${LAUNCH_WHERE[@]}" \
    --worker="$WORKER" ${ssh_flags[@]+"${ssh_flags[@]}"}
  [[ $DRY_RUN == 1 ]] || rm -f "$tarball"
  launch_template code_step <<'EOF'
rm -rf "$DIR.new"
mkdir -p "$DIR.new"
tar -xzf "$HOME/@TARBALL@" -C "$DIR.new"
rm -rf "$DIR"
mv "$DIR.new" "$DIR"
rm -f "$HOME/@TARBALL@"
say "code: copy of the launching checkout in $DIR"
EOF
  launch_fill code_step @TARBALL@ "$tarball_remote"
else
  launch_template code_step <<'EOF'
if [ ! -d "$DIR/.git" ]; then git clone --quiet @URL@ "$DIR"; fi
git -C "$DIR" remote set-url origin @URL@
git -C "$DIR" fetch --quiet --tags origin @REF@
git -C "$DIR" checkout --quiet --force --detach FETCH_HEAD
say "code: $(git -C "$DIR" rev-parse --short HEAD) (@REF@) in $DIR"
EOF
  launch_fill code_step @URL@ "$(launch_quote "$REPO_URL")" @REF@ "$(launch_quote "$REF")"
fi

# --- step 4, the bucket mount ---
mount_step=':'
if [[ -n $MOUNT_BUCKET ]]; then
  launch_template mount_step <<'EOF'
MNT=@MNT@
if ! command -v gcsfuse >/dev/null 2>&1; then
  say "installing gcsfuse"
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
fi
mkdir -p "$MNT"
if mountpoint -q "$MNT"; then
  say "gs://@BUCKET@ is mounted at $MNT"
else
  gcsfuse --implicit-dirs @BUCKET@ "$MNT"
  say "mounted gs://@BUCKET@ at $MNT"
fi
EOF
  launch_fill mount_step @MNT@ "$(launch_remote_path "$MOUNT_POINT")" @BUCKET@ "$MOUNT_BUCKET"
fi

# --- steps 2 and 3, the environment ---
spec=".[${EXTRAS}]"
[[ -z $EXTRAS ]] && spec="."
package_words=""
for p in $PACKAGES; do package_words+=" $(launch_quote "$p")"; done
force_line=':'
# shellcheck disable=SC2016  # expanded on the worker
[[ $FORCE == 1 ]] && force_line='rm -f "$stamp"'
launch_template env_step <<'EOF'
export PATH="$HOME/.local/bin:$PATH"
if ! command -v uv >/dev/null 2>&1; then
  say "installing uv"
  python3 -m pip install --user --quiet uv || curl -LsSf https://astral.sh/uv/install.sh | sh
fi
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV (Python @PYTHON@)"
  uv venv --quiet --python @PYTHON@ "$VENV"
fi
key="$( { cat "$DIR/setup.py"; echo @SPEC@@PACKAGES@; } | sha256sum | cut -c1-16)"
stamp="$VENV/.pixart_jax-installed-$key"
@FORCE@
if [ -f "$stamp" ]; then
  say "dependencies up to date ($stamp)"
else
  say "installing @SPEC@@PACKAGES@"
  (cd "$DIR" && uv pip install --quiet --python "$VENV/bin/python" -e @SPEC@@PACKAGES@)
  rm -f "$VENV"/.pixart_jax-installed-*
  touch "$stamp"
fi
EOF
launch_fill env_step @PYTHON@ "$PYTHON" @SPEC@ "$(launch_quote "$spec")" @PACKAGES@ "$package_words" \
  @FORCE@ "$force_line"

# --- step 5, the check ---
check_step=':'
if [[ $CHECK == 1 ]]; then
  launch_template check_step <<'EOF'
timeout 900 "$VENV/bin/python" - <<'PY'
import socket
import jax
try:  # on a pod slice every worker runs this at once, and JAX connects them
  jax.distributed.initialize()
except (RuntimeError, ValueError) as e:  # one process (no cluster detected)
  print("jax.distributed.initialize() not used:", e)
print(f"[{socket.gethostname()}] process {jax.process_index()} of {jax.process_count()}:"
      f" {jax.local_device_count()} local devices, jax.device_count()={jax.device_count()}"
      f" ({jax.devices()[0].device_kind})")
PY
EOF
fi

launch_template remote <<'EOF'
set -euo pipefail
cd "$HOME"
say() { echo "[$(hostname)] $*"; }
DIR=@DIR@
VENV=@VENV@
@CODE@
@ENV@
@MOUNT@
@CHECK@
say "setup done"
EOF
launch_fill remote @DIR@ "$dir" @VENV@ "$venv" @CODE@ "$code_step" @ENV@ "$env_step" @MOUNT@ "$mount_step" \
  @CHECK@ "$check_step"

launch_ssh "$WORKER" "$remote" ${ssh_flags[@]+"${ssh_flags[@]}"}
launch_info "next: launch/run.sh NAME=$NAME ZONE=$ZONE WORKDIR=gs://BUCKET/runs/RUN -- python -m pixart_jax.train --config ..."
