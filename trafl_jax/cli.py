"""What every command line of trafl_jax shares: flag parsing and config loading that fail with one clear
line (no traceback), default workdirs, and quiet library logs."""

from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import flags, logging


def parse_flags(argv):
  """`app.run(..., flags_parser=parse_flags)`: a mistyped config key or a bad value is one line."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
    message = " ".join(str(e).replace("\\'", "'").replace("\\n", "\n").split()).strip("'\"")
    if isinstance(e, (AttributeError, KeyError)):
      message = "unknown config key '" + message
    print(f"error: bad command line: {message}", file=sys.stderr)
    sys.exit(2)


def load_config(config_flag):
  """The config of a `config_flags` flag, or exit 2 naming why it did not load."""
  try:
    config = config_flag.value
    config.to_dict()  # a config that failed to load raises here, not deep inside the run
  except (OSError, AttributeError, ValueError) as e:
    print(f"error: cannot load --config: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(2)
  return config


def default_workdir(config_path: str, prefix: str = "") -> str:
  """`runs/<prefix><config>[_<variant>]` for `configs/<config>.py[:<variant>]`."""
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  variant = config_path.split(":", 1)[1].replace(",", "_") if ":" in config_path else ""
  return os.path.join("runs", prefix + name + (f"_{variant}" if variant else ""))


class _QuietLibraries:
  """Keeps orbax's and grain's per-save INFO chatter out of the console (warnings still show)."""

  def filter(self, record):
    # Python's level numbers (absl.logging.WARNING is absl's verbosity, -1, which every record passes).
    return record.levelno >= std_logging.WARNING or not any(
      lib in record.pathname for lib in ("orbax", "grain", "xla_bridge")
    )


def quiet_libraries() -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
