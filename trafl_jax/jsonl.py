"""Reading JSON-lines files: the one reader behind every JSONL input of trafl_jax.

Training data (`data.load_jsonl`), task files (`tasks`), prompt files (`sample`) and the files runs append
to themselves (`metrics`, `evaluate`) all read through `read`, so every malformed line is reported the same
way: the file and the 1-based line. Pure Python (task loaders run in spawned worker processes).

Dimension legend: none (pure Python, no arrays).
"""

import gzip
import json
import os
from typing import Any

from absl import logging


def read(path: str, skip_corrupt: bool = False) -> list[tuple[str, dict[str, Any]]]:
  """`(where, record)` for each JSON object in a .jsonl (or gzipped .jsonl.gz) file, in order.

  `where` is "<path>, line <N>" (1-based), for the caller's own errors about a record. Blank lines are
  skipped. A line that is not UTF-8, not JSON or not a JSON object raises ValueError naming the file and
  line, unless `skip_corrupt`: then it is dropped with a warning. That is for the files a run appends to
  itself, where a kill can leave a line cut short (and a later run appends after it).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"JSONL file not found: {path}")
  opener = gzip.open if path.endswith(".gz") else open
  records = []
  # Binary read + per-line decode so a UTF-8 error is reported at its own line.
  with opener(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      where = f"{path}, line {lineno}"
      try:
        record = _parse(raw)
      except ValueError as e:
        if not skip_corrupt:
          raise ValueError(f"{where}: {e}") from None
        logging.warning("%s: skipping a corrupt line (%s), e.g. one cut short by a kill", where, e)
        continue
      if record is not None:
        records.append((where, record))
  return records


def _parse(raw: bytes) -> dict[str, Any] | None:
  """The object on one line, None for a blank line; ValueError says what is wrong with it."""
  try:
    line = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"not valid UTF-8 ({e.reason})") from None
  if not line.strip():
    return None
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"invalid JSON ({e.msg})") from None
  if not isinstance(record, dict):
    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
  return record
