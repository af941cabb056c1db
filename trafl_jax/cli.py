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


_LOG_LIBRARIES = flags.DEFINE_bool(
  "log_libraries",
  False,
  "Also show the INFO logs of libraries (orbax, grain, JAX, ...); by default the console shows "
  "trafl_jax's own messages and every warning and error. --verbosity=1 (debug) shows them too.",
)
# Where our own code lives: this package and the repository's scripts/ (as imported, and resolved).
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_OWN_DIRS = tuple(
  os.path.join(resolve(d), "")
  for d in (_PACKAGE_DIR, os.path.join(os.path.dirname(_PACKAGE_DIR), "scripts"))
  for resolve in (os.path.abspath, os.path.realpath)
)


class _QuietLibraries:
  """Keeps the libraries' INFO and DEBUG records (orbax's per-read and per-save chatter, grain's,
  JAX's backend probing) out of the console; warnings and errors, and all of ours, still show."""

  def filter(self, record):
    # Python's level numbers (absl.logging.WARNING is absl's verbosity, -1, which every record passes).
    return record.levelno >= std_logging.WARNING or record.pathname.startswith(_OWN_DIRS)


def quiet_libraries() -> None:
  """Every command line's first call in `main`: only our messages unless --log_libraries or
  --verbosity>=1 asked for more. Idempotent."""
  if flags.FLAGS.is_parsed() and (_LOG_LIBRARIES.value or logging.get_verbosity() > logging.INFO):
    return
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
