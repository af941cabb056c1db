#!/usr/bin/env bash
# Needs: the gcloud CLI, logged in (`gcloud auth login`), with a project that has Cloud TPU quota for
#   ACCELERATOR_TYPE in ZONE; a GCS bucket (BUCKET) in the same region that the TPU VMs' service account
#   may read and write (roles/storage.objectAdmin); run from a checkout of this repository (or set
#   REPO_URL so that every worker clones it). The workers need internet access: setup installs gcsfuse
#   (apt), uv and Python 3.11 with jax[tpu]==0.10.2 and requirements.txt (PyPI).
#
# Runs the main job on a Cloud TPU VM pod slice: every worker runs the same command, and
# jax.distributed.initialize() finds the slice by itself. The bucket is mounted with gcsfuse at
# /gcs/BUCKET on every worker, and the workdir lives there: every process writes its checkpoint shards
# into it and process 0 writes the logs. A WORKDIR (or a flag value) of gs://BUCKET/... is rewritten to
# /gcs/BUCKET/..., because trafl_jax reads and writes its workdir with ordinary file operations.
#
# Settings (environment variables):
#   TPU_NAME          name of the TPU VM (default trafl)
#   ZONE              e.g. us-central2-b (v4), us-west4-a (v5litepod), us-east5-a (v5p); required
#   ACCELERATOR_TYPE  e.g. v4-32, v5litepod-64, v5p-32 (default v4-32)
#   RUNTIME_VERSION   TPU VM image; default from ACCELERATOR_TYPE: tpu-ubuntu2204-base (v4),
#                     v2-alpha-tpuv5-lite (v5litepod), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)
#   PROJECT           Google Cloud project (default: gcloud's configured project)
#   SPOT=1            create a Spot TPU VM (preemptible; resume by running `run` again once it is back)
#   BUCKET            GCS bucket name without gs:// (required by setup and run)
#   CONFIG            config of the run (default configs/math.py:small)
#   WORKDIR           default /gcs/BUCKET/runs/TPU_NAME; gs://BUCKET/... is accepted and rewritten
#   REPO_URL          clone this repository on every worker instead of copying the local checkout
#   REPO_REF          with REPO_URL: a commit, a tag or origin/BRANCH (default origin/HEAD)
#
# Examples:
#   export TPU_NAME=trafl ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 BUCKET=my-bucket
#   launch/tpu_pod.sh create            # the TPU VM (SPOT=1 for a Spot one)
#   launch/tpu_pod.sh setup             # copy the code, mount the bucket, install Python and jax[tpu]
#   launch/tpu_pod.sh run               # CONFIG on every worker, in the background
#   launch/tpu_pod.sh logs              # follow worker 0's log (Ctrl-C stops following, not the run)
#   launch/tpu_pod.sh stop              # SIGTERM everywhere: save a checkpoint, exit 0
#   launch/tpu_pod.sh run               # the same command again resumes from the checkpoint
#   launch/tpu_pod.sh delete
# LLaDA-8B-Instruct GSM8K post-training (FSDP over all chips, bfloat16), weights and data in the bucket:
#   CONFIG=configs/math.py:gsm8k WORKDIR=gs://my-bucket/runs/gsm8k launch/tpu_pod.sh run \
#     --config.rl.reference=gs://my-bucket/ckpt/llada8b --config.rl.train_path=gs://my-bucket/gsm8k/train.jsonl
# Converting the Hugging Face weights once, on worker 0, into the bucket:
#   launch/tpu_pod.sh exec 0 'cd ~/trafl_jax && ~/trafl_venv/bin/python -m trafl_jax.convert \
#     --src=/path/to/LLaDA-8B-Instruct --dst=/gcs/my-bucket/ckpt/llada8b'
# Other subcommands: sync (copy the code again after changing it), status, exec WORKER|all 'COMMAND'.
set -euo pipefail

JAX_VERSION=0.10.2 # equal to requirements.txt's pin (tests/test_launchers.py checks)
PYTHON_VERSION=3.11
TPU_NAME="${TPU_NAME:-trafl}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
CONFIG="${CONFIG:-configs/math.py:small}"
# shellcheck disable=SC2088 # the tilde is for the workers' shell to expand
REMOTE_DIR='~/trafl_jax'

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 1
}

default_runtime() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default RUNTIME_VERSION for ACCELERATOR_TYPE=$1; set RUNTIME_VERSION" ;;
  esac
}

# ---------------------------------------------------------------------------------------------------
# Local side: gcloud calls.

# `tpu SUBCOMMAND ARGS...` = gcloud compute tpus tpu-vm SUBCOMMAND ARGS... --zone --project.
# (Arrays are expanded as ${a[@]+"${a[@]}"} so that bash 3.2, macOS's, accepts an empty one under set -u.)
tpu() {
  [[ -n "${ZONE:-}" ]] || die "set ZONE (e.g. ZONE=us-central2-b)"
  local project=()
  if [[ -n "${PROJECT:-}" ]]; then project=(--project="$PROJECT"); fi
  gcloud compute tpus tpu-vm "$@" --zone="$ZONE" ${project[@]+"${project[@]}"}
}

# Runs a command line on workers ("all" or an index) with the settings the worker side reads.
on_workers() {
  local worker="$1"
  shift
  local env_line
  env_line="$(printf 'export BUCKET=%q JAX_VERSION=%q PYTHON_VERSION=%q; ' \
    "${BUCKET:-}" "$JAX_VERSION" "$PYTHON_VERSION")"
  tpu ssh "$TPU_NAME" --worker="$worker" --command="$env_line$*"
}

need_bucket() {
  [[ -n "${BUCKET:-}" ]] || die "set BUCKET (the GCS bucket name, without gs://)"
  [[ "$BUCKET" != gs://* ]] || die "BUCKET is the bare name: BUCKET=${BUCKET#gs://}"
}

# gs://BUCKET/x -> /gcs/BUCKET/x, in a path or inside a --flag=value.
to_mount() {
  local value="$1"
  if [[ "$value" == *gs://* ]]; then
    [[ "$value" == *"gs://$BUCKET/"* || "$value" == *"gs://$BUCKET" ]] ||
      die "$value: only gs://$BUCKET is mounted on the workers"
    value="${value//gs:\/\/$BUCKET//gcs/$BUCKET}"
  fi
  printf '%s' "$value"
}

copy_code() {
  if [[ -n "${REPO_URL:-}" ]]; then
    local ref="${REPO_REF:-}"
    on_workers all "set -e; if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch -q origin; \
else rm -rf $REMOTE_DIR; git clone -q $(printf %q "$REPO_URL") $REMOTE_DIR; fi; \
git -C $REMOTE_DIR checkout -q $(printf %q "${ref:-origin/HEAD}")"
    return
  fi
  local root tmp files=() f
  root="$(cd "$(dirname "$0")/.." && pwd)"
  [[ -f "$root/trafl_jax/main.py" ]] || die "run from a checkout of trafl_jax (or set REPO_URL)"
  tmp="$(mktemp -d)"
  if git -C "$root" rev-parse --git-dir >/dev/null 2>&1; then
    # Tracked and untracked-but-not-ignored files (what `git status` shows), without runs/.
    while IFS= read -r -d '' f; do
      if [[ -f "$root/$f" && "$f" != runs/* ]]; then files+=("$f"); fi
    done < <(git -C "$root" ls-files -z --cached --others --exclude-standard)
    (cd "$root" && tar -czf "$tmp/trafl_jax.tar.gz" "${files[@]}")
  else
    (cd "$root" && tar -czf "$tmp/trafl_jax.tar.gz" --exclude=./runs --exclude=./.git .)
  fi
  tpu scp "$tmp/trafl_jax.tar.gz" "$TPU_NAME:trafl_jax.tar.gz" --worker=all
  on_workers all "set -e; rm -rf $REMOTE_DIR.new && mkdir -p $REMOTE_DIR.new && \
tar -xzf ~/trafl_jax.tar.gz -C $REMOTE_DIR.new && rm -rf $REMOTE_DIR && mv $REMOTE_DIR.new $REMOTE_DIR && \
rm ~/trafl_jax.tar.gz"
  rm -rf "$tmp"
}

cmd_create() {
  local runtime="${RUNTIME_VERSION:-}" spot=()
  if [[ -z "$runtime" ]]; then runtime="$(default_runtime "$ACCELERATOR_TYPE")"; fi
  if [[ "${SPOT:-0}" == 1 ]]; then spot=(--spot); fi
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$runtime" ${spot[@]+"${spot[@]}"}
}

cmd_setup() {
  need_bucket
  copy_code
  on_workers all "bash $REMOTE_DIR/launch/tpu_pod.sh _worker_setup"
}

cmd_run() {
  need_bucket
  local workdir
  workdir="$(to_mount "${WORKDIR:-/gcs/$BUCKET/runs/$TPU_NAME}")"
  [[ "$workdir" == /gcs/"$BUCKET"/* ]] || echo "warning: WORKDIR=$workdir is not in the bucket:" \
    "every worker must see the same directory" >&2
  local args=(--config="$CONFIG" --workdir="$workdir")
  local a
  for a in "$@"; do args+=("$(to_mount "$a")"); done
  echo "on every worker: python -m trafl_jax.main ${args[*]}"
  on_workers all "bash $REMOTE_DIR/launch/tpu_pod.sh _worker_start $(printf '%q ' "${args[@]}")"
  echo "started; follow with: launch/tpu_pod.sh logs"
}

cmd_exec() {
  [[ $# -ge 2 ]] || die "usage: tpu_pod.sh exec WORKER|all 'COMMAND'"
  on_workers "$1" "${@:2}"
}

cmd_logs() {
  # shellcheck disable=SC2016 # $HOME is the worker's
  tpu ssh "$TPU_NAME" --worker="${1:-0}" --command='tail -n 200 -F "$HOME/trafl_run.log"'
}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d'
  exit "${1:-0}"
}

# ---------------------------------------------------------------------------------------------------
# Worker side (run by the subcommands above on every TPU VM worker, from the copied checkout).

worker_mount() {
  local mount="/gcs/$BUCKET"
  mountpoint -q "$mount" && return
  sudo mkdir -p "$mount"
  sudo chown "$(id -u):$(id -g)" "$mount"
  # Directory renames (orbax finalizes a checkpoint by renaming its temporary directory) and no
  # metadata cache, so that every worker sees the others' writes at once.
  gcsfuse --implicit-dirs --rename-dir-limit=1000000 --metadata-cache-ttl-secs=0 "$BUCKET" "$mount"
}

worker_setup() {
  need_bucket
  if ! command -v gcsfuse >/dev/null; then
    local repo
    repo="gcsfuse-$(lsb_release -c -s)"
    curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg |
      sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
    echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt $repo main" |
      sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
    # A fresh VM's unattended upgrades hold the dpkg lock for a while: wait for it.
    sudo apt-get -o DPkg::Lock::Timeout=600 update -q
    sudo apt-get -o DPkg::Lock::Timeout=600 install -y -q gcsfuse
  fi
  worker_mount
  if [[ ! -x "$HOME/.local/bin/uv" ]]; then
    curl -LsSf https://astral.sh/uv/install.sh | env UV_NO_MODIFY_PATH=1 sh
  fi
  local uv="$HOME/.local/bin/uv" venv="$HOME/trafl_venv"
  [[ -x "$venv/bin/python" ]] || "$uv" venv --python "$PYTHON_VERSION" "$venv"
  cd "$(dirname "$0")/.."
  # requirements.txt pins the CPU jax; on a TPU VM jax comes with its TPU extra at the same version.
  grep -vE '^(jax|jaxlib)([=<>~! ]|$)' requirements.txt >"$HOME/trafl_requirements_nojax.txt"
  "$uv" pip install --python "$venv/bin/python" "jax[tpu]==$JAX_VERSION" \
    -r "$HOME/trafl_requirements_nojax.txt"
  # (Not jax.devices(): on a multi-host slice that waits for every worker's TPU runtime.)
  "$venv/bin/python" -c "import importlib.metadata as m; print('$(hostname):', *(p + ' ' + m.version(p) for p in ('jax', 'jaxlib', 'libtpu')))"
}

worker_pid() {
  local pidfile="$HOME/trafl_run.pid" pid
  [[ -f "$pidfile" ]] || return 1
  pid="$(cat "$pidfile")"
  # Only our own run: the pid must still be a trafl_jax.main process.
  tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q 'trafl_jax.main' || return 1
  echo "$pid"
}

worker_start() {
  need_bucket
  worker_mount
  local pid
  if pid="$(worker_pid)"; then die "$(hostname): a run is already going (pid $pid); stop it first"; fi
  cd "$(dirname "$0")/.."
  echo "=== $(date -u +%FT%TZ) start: python -m trafl_jax.main $*" >>"$HOME/trafl_run.log"
  # setsid + nohup + no terminal: the run survives the ssh session that started it.
  PYTHONUNBUFFERED=1 setsid nohup "$HOME/trafl_venv/bin/python" -m trafl_jax.main "$@" \
    >>"$HOME/trafl_run.log" 2>&1 </dev/null &
  echo $! >"$HOME/trafl_run.pid"
  sleep 2
  pid="$(worker_pid)" || die "$(hostname): the run exited at once; see $HOME/trafl_run.log"
  echo "$(hostname): started pid $pid"
}

worker_stop() {
  local pid
  pid="$(worker_pid)" || {
    echo "$(hostname): no run"
    return 0
  }
  kill -TERM "$pid"
  local waited=0 timeout="${STOP_TIMEOUT:-900}"
  while kill -0 "$pid" 2>/dev/null; do
    ((waited >= timeout)) && die "$(hostname): pid $pid still running after ${timeout}s"
    sleep 1
    waited=$((waited + 1))
  done
  echo "$(hostname): stopped after ${waited}s (checkpoint saved); last lines:"
  tail -n 3 "$HOME/trafl_run.log"
}

worker_status() {
  local pid
  if pid="$(worker_pid)"; then echo "$(hostname): running (pid $pid)"; else echo "$(hostname): not running"; fi
  [[ -f "$HOME/trafl_run.log" ]] && tail -n 2 "$HOME/trafl_run.log"
  return 0
}

# ---------------------------------------------------------------------------------------------------

cmd="${1:-help}"
shift || true
case "$cmd" in
  create) cmd_create ;;
  setup) cmd_setup ;;
  sync) copy_code ;;
  run) cmd_run "$@" ;;
  logs) cmd_logs "$@" ;;
  stop) on_workers all "bash $REMOTE_DIR/launch/tpu_pod.sh _worker_stop" ;;
  status) on_workers all "bash $REMOTE_DIR/launch/tpu_pod.sh _worker_status" ;;
  exec) cmd_exec "$@" ;;
  delete) tpu delete "$TPU_NAME" --quiet ;;
  _worker_setup) worker_setup ;;
  _worker_start) worker_start "$@" ;;
  _worker_stop) worker_stop ;;
  _worker_status) worker_status ;;
  help | -h | --help) usage 0 ;;
  *)
    echo "unknown subcommand: $cmd" >&2
    usage 2
    ;;
esac
