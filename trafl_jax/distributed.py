"""When and how a run joins JAX's multi-controller runtime (`jax.distributed.initialize`).

Every process of a multi-host run executes the same command. Where the settings come from, first match:
  1. `--coordinator_address/--num_processes/--process_id`, or the environment variables
     `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (GPU clusters without SLURM, local
     multi-process runs: launch/local_multiprocess.sh);
  2. SLURM: inside `srun` with more than one task, JAX reads the SLURM_* variables itself;
  3. a Cloud TPU VM (libtpu installed and TPU chips present): JAX reads the slice's metadata itself.
Otherwise the run is one process. `--distributed=yes` initializes even when nothing is detected (JAX's
own cluster detection then decides); `--distributed=no` never does.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from collections.abc import Mapping

import numpy as np

MODES = ("auto", "yes", "no")


def _int(value, name: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _in_slurm_step(environ: Mapping[str, str]) -> bool:
  needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  return (
    all(k in environ for k in needed) and (_int(environ["SLURM_NTASKS"], "SLURM_NTASKS") or 1) > 1
  )


def on_cloud_tpu_vm() -> bool:
  chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
  return bool(chips) and importlib.util.find_spec("libtpu") is not None


def settings(
  mode: str = "auto",
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  environ: Mapping[str, str] | None = None,
  tpu_vm: bool | None = None,
) -> dict | None:
  """The keyword arguments for `jax.distributed.initialize` ({} = JAX detects the cluster), or None
  for a single-process run. Flags win over environment variables."""
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r} is not one of {MODES}")
  if mode == "no":
    return None
  environ = os.environ if environ is None else environ
  address = coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS") or None
  count = num_processes if num_processes is not None else None
  if count is None:
    count = _int(environ.get("JAX_NUM_PROCESSES"), "JAX_NUM_PROCESSES")
  index = process_id if process_id is not None else None
  if index is None:
    index = _int(environ.get("JAX_PROCESS_ID"), "JAX_PROCESS_ID")
  if count is not None or index is not None:
    if count is not None and count < 1:
      raise ValueError(f"the number of processes must be at least 1, got {count}")
    if count == 1 and mode == "auto":
      return None
    missing = [
      name
      for name, value in (
        ("--coordinator_address (or JAX_COORDINATOR_ADDRESS)", address),
        ("--num_processes (or JAX_NUM_PROCESSES)", count),
        ("--process_id (or JAX_PROCESS_ID)", index),
      )
      if value is None
    ]
    if missing:
      raise ValueError(f"a multi-process run also needs {', '.join(missing)}")
    if not 0 <= index < count:
      raise ValueError(f"process id {index} is not in [0, {count}) processes")
    return {"coordinator_address": address, "num_processes": count, "process_id": index}
  if mode == "yes" or _in_slurm_step(environ):
    return {"coordinator_address": address} if address else {}
  if tpu_vm if tpu_vm is not None else on_cloud_tpu_vm():
    return {}
  return None


def initialize(kwargs: dict | None) -> None:
  """Joins the runtime with `settings(...)`'s answer; a failure names what was tried."""
  if kwargs is None:
    return
  import jax

  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # noqa: BLE001 -- any failure here means the same thing to the user
    shown = ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "settings detected by JAX"
    raise RuntimeError(f"could not join the multi-process run ({shown}): {e}") from e


def map_split(fn, items: list) -> list[float]:
  """`fn(items)` (a list of floats, one per item) with the work split over the processes: process p
  computes items p, p + P, ...; every process returns the whole list in order. One process: `fn(items)`."""
  import jax

  count = jax.process_count()
  if count == 1:
    return [float(x) for x in fn(items)]
  from jax.experimental import multihost_utils

  index = jax.process_index()
  per_process = -(-len(items) // count)
  mine = np.full(per_process, np.nan, np.float64)
  values = fn(items[index::count]) if items[index::count] else []
  mine[: len(values)] = values
  gathered = np.asarray(multihost_utils.process_allgather(mine))  # [processes, per_process]
  return [float(gathered[i % count, i // count]) for i in range(len(items))]
