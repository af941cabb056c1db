"""Entry point: `python -m trafl_jax.main --config=configs/math.py[:variant] --workdir=DIR`."""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and caches go.")
_MAX_STEPS = flags.DEFINE_integer(
  "max_steps", None, "Run at most this many steps in this invocation, then checkpoint and exit."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def _default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  variant = config_path.split(":", 1)[1].replace(",", "_") if ":" in config_path else ""
  return os.path.join("runs", name + (f"_{variant}" if variant else ""))


class _QuietLibraries:
  """Keeps orbax's and grain's per-save INFO chatter out of the console (warnings still show)."""

  def filter(self, record):
    return record.levelno >= 30 or not any(
      lib in record.pathname for lib in ("orbax", "grain", "xla_bridge")
    )


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import jax  # after flags: XLA_FLAGS set by the caller must be read first

  if _NUM_PROCESSES.value and _NUM_PROCESSES.value > 1:
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  from trafl_jax import checkpoint, train

  try:
    config = _CONFIG.value
    config.to_dict()  # a config that failed to load raises here, not deep inside the run
  except (OSError, AttributeError, ValueError) as e:
    print(f"error: cannot load --config: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(2)
  workdir = _WORKDIR.value or _default_workdir(flags.FLAGS["config"].config_filename)
  logging.info("workdir %s", os.path.abspath(workdir))
  try:
    train.run(config, workdir, max_steps=_MAX_STEPS.value)
  except (ValueError, FileNotFoundError, FloatingPointError, checkpoint.CheckpointError) as e:
    # One clear line for the user; the traceback is still in the log at debug level.
    logging.debug("failed", exc_info=True)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def _parse_flags(argv):
  """Flag parsing with one clear line for a mistyped config key or a bad value (no traceback)."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
    message = " ".join(str(e).replace("\\'", "'").replace("\\n", "\n").split()).strip("'\"")
    if isinstance(e, (AttributeError, KeyError)):
      message = "unknown config key '" + message
    print(f"error: bad command line: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=_parse_flags)
