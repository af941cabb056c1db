#!/usr/bin/env bash
# Needs: python3 with requirements.txt installed; run from anywhere. No accelerator.
# Runs the main job on N fake CPU devices (default 8) to prototype sharding on a laptop, e.g.
#   launch/fake_devices.sh 8 --config=configs/math.py:tiny --config.mesh.tensor=2 --workdir=/tmp/tiny
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-8}"
shift || true
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${n}"
export JAX_PLATFORMS=cpu
exec python3 -m trafl_jax.main "$@"
