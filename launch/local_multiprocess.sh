#!/usr/bin/env bash
# Runs N processes x M fake CPU devices of one job on this machine, the way a multi-host run starts:
# every process gets the same command plus JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
#
# Needs: python3 with requirements.txt installed; a free localhost port (picked automatically, or PORT=...).
# Usage:
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS -- <trafl_jax.main flags>
#   launch/local_multiprocess.sh 2 4 -- --config=configs/math.py:tiny --workdir=/tmp/mp
# MODULE=trafl_jax.evaluate (default trafl_jax.main) runs another entry point the same way.
# Process 0 prints to this terminal; process i > 0 logs to <LOG_DIR>/process_<i>.log (LOG_DIR defaults
# to a fresh temporary directory, printed at the start). SIGTERM / Ctrl-C is passed to every process
# (they save a checkpoint together and exit 0); the exit status is the first failing process's.
set -euo pipefail

if [[ $# -lt 3 || "$3" != "--" ]]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
num_processes=$1
devices=$2
shift 3
module=${MODULE:-trafl_jax.main}
port=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
log_dir=${LOG_DIR:-$(mktemp -d -t trafl_mp.XXXXXX)}
mkdir -p "$log_dir"
echo "local multi-process run: ${num_processes} processes x ${devices} devices, coordinator localhost:${port}, logs in ${log_dir}" >&2

pids=()
forward() {
  local child
  for child in "${pids[@]}"; do kill -TERM "$child" 2>/dev/null || true; done
}
trap forward TERM INT

run_process() {  # runs in a background subshell: exec makes its pid the python process
  exec env XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}" \
    JAX_PLATFORMS=cpu \
    JAX_COORDINATOR_ADDRESS="localhost:${port}" \
    JAX_NUM_PROCESSES="$num_processes" \
    JAX_PROCESS_ID="$1" \
    python3 -m "$module" "${@:2}"
}
for ((i = 0; i < num_processes; i++)); do
  if ((i == 0)); then
    run_process "$i" "$@" &
  else
    run_process "$i" "$@" > "${log_dir}/process_${i}.log" 2>&1 &
  fi
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  # A trapped signal interrupts `wait` (status > 128 while the process lives on): wait again.
  while true; do
    set +e
    wait "$pid"
    rc=$?
    set -e
    kill -0 "$pid" 2>/dev/null || break
  done
  if ((rc != 0 && status == 0)); then status=$rc; fi
done
exit "$status"
