"""Entry point: `python -m trafl_jax.main --config=configs/math.py[:variant] --workdir=DIR`."""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from trafl_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and caches go.")
_MAX_STEPS = flags.DEFINE_integer(
  "max_steps", None, "Run at most this many steps in this invocation, then checkpoint and exit."
)
_DISTRIBUTED = flags.DEFINE_enum(
  "distributed",
  "auto",
  ["auto", "yes", "no"],
  "Join a multi-process run: auto = when flags, JAX_* variables, SLURM or a TPU VM say so.",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0 (or JAX_COORDINATOR_ADDRESS)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "Processes in a multi-host run (or JAX_NUM_PROCESSES)."
)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (or JAX_PROCESS_ID).")


def main(argv):
  del argv
  cli.quiet_libraries()
  from trafl_jax import distributed

  try:  # before anything touches a JAX backend
    distributed.initialize(
      distributed.settings(
        _DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
      )
    )
  except (ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  from trafl_jax import checkpoint, pipeline

  config = cli.load_config(_CONFIG)
  workdir = _WORKDIR.value or cli.default_workdir(flags.FLAGS["config"].config_filename)
  logging.info("workdir %s", os.path.abspath(workdir))
  try:
    pipeline.run(config, workdir, max_steps=_MAX_STEPS.value)
  except (ValueError, FileNotFoundError, FloatingPointError, checkpoint.CheckpointError) as e:
    # One clear line for the user; the traceback is still in the log at debug level.
    logging.debug("failed", exc_info=True)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=cli.parse_flags)
