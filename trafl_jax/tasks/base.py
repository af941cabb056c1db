"""What every task module shares: the task names, `Problem`, and reading task files.

The family modules that build `Problem`s (math, code) and the package's dispatch (`tasks/__init__.py`)
import this module, and it imports none of them: the dependencies go one way.

Dimension legend: none (pure Python, no arrays).
"""

import dataclasses
import os
from typing import Any

from trafl_jax import jsonl

TASKS = ("countdown", "gsm8k", "math", "humaneval", "mbpp")


@dataclasses.dataclass(frozen=True)
class Problem:
  """One prompt of a task and what its reward needs.

  `reference` is, per task: countdown `{"numbers": [...], "target": int}`; gsm8k and math the
  gold answer string; humaneval and mbpp `{"tests": str, "entry_point": str, ...}`.
  """

  task: str  # One of TASKS.
  id: str  # Stable across runs, e.g. "gsm8k/test/17", "HumanEval/0", "countdown/seed0/5".
  prompt: str  # The question put into the task's prompt template (no chat template).
  reference: Any


# ----------------------------------------------------------------------------------------------
# Reading task files.


def read_jsonl(path: str, fields: dict[str, type | tuple[type, ...]]) -> list[tuple[str, dict]]:
  """`(where, row)` for each JSON object in a .jsonl or .jsonl.gz file, `where` = "path, line N".

  Every row must have `fields` with the given types; errors name the file and 1-based line.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Task file not found: {path}")
  rows = jsonl.read(path)
  for where, row in rows:
    for key, kind in fields.items():
      if key not in row:
        raise ValueError(f"{where}: missing field {key!r} (has {sorted(row)})")
      if not isinstance(row[key], kind):
        raise ValueError(f"{where}: field {key!r} has type {type(row[key]).__name__}")
  if not rows:
    raise ValueError(f"{path}: no records (empty file or only blank lines)")
  return rows


def hf_rows(name: str, split: str, config: str | None = None) -> list[tuple[str, dict]]:
  """`(where, row)` for a Hugging Face dataset split; needs `datasets` and network access."""
  try:
    import datasets
  except ImportError:
    raise ImportError(
      f"Loading {name} without a path needs the `datasets` package: `pip install datasets`, "
      "or pass path= to a local JSONL file"
    ) from None
  dataset = datasets.load_dataset(name, config, split=split)
  return [(f"{name}[{split}][{i}]", dict(row)) for i, row in enumerate(dataset)]
