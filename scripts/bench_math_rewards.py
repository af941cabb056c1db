"""Measures how many math answers per second `tasks.rewards` verifies (GSM8K test set).

Needs ../shared/data/gsm8k/test.jsonl (or --path). Usage:
  python scripts/bench_math_rewards.py [--path FILE] [--repeats 3] [--workers N]
"""

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from trafl_jax import tasks  # noqa: E402
from trafl_jax.tasks import math as math_tasks  # noqa: E402


def main() -> None:
  default = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--path", default=str(default))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--workers", type=int, default=None)
  args = parser.parse_args()

  problems = tasks.load("gsm8k", path=args.path)
  # Realistic completions: some reasoning, then the boxed answer; half right, half off by one.
  prefix = "Let's think step by step. First we add the numbers, then we subtract. " * 4
  right = [f"{prefix}So the answer is \\boxed{{{p.reference}}}." for p in problems]
  wrong = [f"{prefix}So the answer is \\boxed{{{int(float(p.reference)) + 1}}}." for p in problems]
  batch, completions = problems + problems, right + wrong

  start = time.perf_counter()
  tasks.rewards(batch[:4], completions[:4], workers=args.workers)
  print(f"pool start + first call: {time.perf_counter() - start:.2f} s")
  for _ in range(args.repeats):
    start = time.perf_counter()
    scores = tasks.rewards(batch, completions, workers=args.workers)
    seconds = time.perf_counter() - start
    assert sum(scores) == len(problems), sum(scores)
    print(
      f"{len(batch)} answers in {seconds:.2f} s: {len(batch) / seconds:.0f} answers/s "
      f"({args.workers or math_tasks.default_workers()} workers)"
    )
  # In-process, one core, for comparison: the pool's overhead vs. math_verify itself.
  math_tasks.verify_answer("1", "1")  # The first parse loads the LaTeX grammar.
  start = time.perf_counter()
  n = 400
  for p, c in zip(batch[:n], completions[:n]):
    math_tasks.verify_answer(p.reference, tasks.extract_answer(p, c))
  print(f"in-process, one core, no pool: {n / (time.perf_counter() - start):.0f} answers/s")


if __name__ == "__main__":
  main()
