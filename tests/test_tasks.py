"""Tests for trafl_jax.tasks: loaders, prompts, answer extraction and rewards of every family."""

import decimal
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from trafl_jax import tasks
from trafl_jax.tasks import code, countdown
from trafl_jax.tasks import math as math_tasks

from .conftest import ROOT

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def _data_file(*parts: str) -> pathlib.Path:
  path = DATA.joinpath(*parts)
  if not path.is_file():
    pytest.skip(f"shared test data not present: {path}")
  return path


def _has_sandbox() -> bool:
  try:
    from trafl_jax import sandbox  # noqa: F401
  except ImportError:
    return False
  return True


# ----------------------------------------------------------------------------------------------
# Dispatcher.


def test_unknown_task_lists_known_ones():
  with pytest.raises(ValueError, match="countdown, gsm8k, math, humaneval, mbpp"):
    tasks.load("sudoku")
  with pytest.raises(ValueError, match="Unknown task"):
    tasks.rewards([tasks.Problem("sudoku", "x", "", None)], ["1"])


def test_each_family_module_imports_first_in_a_fresh_interpreter():
  # With the old cycle, tasks/__init__ had to define Problem before importing the families; any
  # entry order must work and give one Problem type.
  for first in ("trafl_jax.tasks.base", "trafl_jax.tasks.code", "trafl_jax.tasks.math"):
    check = (
      f"import {first}; from trafl_jax import tasks; from trafl_jax.tasks import base, code, math; "
      "assert tasks.Problem is base.Problem and tasks.TASKS is base.TASKS; "
      "assert all(type(p) is tasks.Problem for p in tasks.load('countdown', limit=2))"
    )
    result = subprocess.run(
      [sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_countdown_load_gives_distinct_problems_of_one_split():
  problems = tasks.load("countdown", limit=50, seed=3, max_number=10)
  keys = [countdown.problem_key(**p.reference) for p in problems]
  assert len(set(keys)) == 50 and [p.id for p in problems] == [f"countdown/{k}" for k in keys]
  for problem in problems:
    ref = problem.reference
    assert tasks.format_prompt(problem) == countdown.prompt_for(ref["numbers"], ref["target"])
    assert countdown.split_of(**ref) == "test"
  # A smaller set is a prefix of a larger one (an evaluation probe is a subset of the prompts).
  assert tasks.load("countdown", limit=10, seed=3, max_number=10) == problems[:10]
  assert (
    tasks.load("countdown", limit=3, seed=1, num_numbers=4)[0].reference["numbers"].__len__() == 4
  )


def test_countdown_splits_partition_the_problem_space():
  """The reference's SFT data, the post-training prompts and the held-out test never share a problem."""
  kw = dict(num_numbers=3, max_number=10)
  space = countdown.problem_space(**kw)
  parts = {
    s: {countdown.problem_key(*p) for p in space if countdown.split_of(*p) == s}
    for s in ("sft", "train", "test")
  }
  assert sum(len(v) for v in parts.values()) == len(
    set(map(lambda p: countdown.problem_key(*p), space))
  )
  assert not (
    parts["sft"] & parts["train"] or parts["sft"] & parts["test"] or parts["train"] & parts["test"]
  )
  for split, keys in parts.items():
    every = tasks.load("countdown", split, seed=0, **kw)  # no limit: the whole part
    assert {countdown.problem_key(**p.reference) for p in every} == keys
  sft = countdown.generate(3000, seed=0, split="sft", **kw)  # the reference's data: repeats allowed
  assert {countdown.problem_key(p["numbers"], p["target"]) for p in sft} <= parts["sft"]
  with pytest.raises(ValueError, match=r"holds \d+ distinct problems .* fewer than the 5000"):
    tasks.load("countdown", "test", limit=5000, **kw)


def test_hub_loading_without_datasets_says_what_to_do():
  if importlib.util.find_spec("datasets") is not None:
    pytest.skip("datasets is installed; this test must not touch the network")
  with pytest.raises(ImportError, match="pip install datasets"):
    tasks.load("gsm8k")


# ----------------------------------------------------------------------------------------------
# Countdown.


@pytest.mark.parametrize(
  "completion, expected",
  [
    ("3*7+12", 1.0),
    ("  12+7*3\nbecause 7*3 is 21", 1.0),  # First line only; any order of the numbers.
    ("3 * 7 + 12", 1.0),
    ("<answer>12 + 3*7</answer>", 1.0),
    ("I think 3+7+12.\n<answer> 3*7+12 </answer>", 1.0),
    ("so the answer is \\boxed{3 \\times 7 + 12}", 1.0),
    ("3*7+12+3", 0.0),  # Reuses 3.
    ("3*7", 0.0),  # Omits 12.
    ("3*7+12=33", 0.0),  # Only the bare expression is an answer.
    ("3*7-12", 0.0),  # Wrong value.
    ("blah blah", 0.0),
    ("", 0.0),
    ("<answer></answer>", 0.0),
  ],
)
def test_countdown_reward(completion, expected):
  problem = tasks.Problem(
    "countdown", "c", countdown.prompt_for([3, 7, 12], 33), {"numbers": [3, 7, 12], "target": 33}
  )
  assert tasks.rewards([problem], [completion]) == [expected]


def test_countdown_exact_rationals_and_division_by_zero():
  # 7/2 = 3.5 is not an integer, but 7/2*4 = 14 exactly.
  assert countdown.reward("7/2*4", [7, 2, 4], 14) == 1.0
  assert countdown.reward("4/3*3", [4, 3, 3], 4) == 1.0  # Floats would give 3.9999999999999996.
  assert countdown.reward("1/3+1/3", [1, 3, 1, 3], 1) == 0.0  # 2/3, not 1.
  assert countdown.reward("5/(2-2)", [5, 2, 2], 5) == 0.0
  assert countdown.reward("5/0", [5, 0], 5) == 0.0
  assert countdown.extract_answer("<answer>\n 7 / 2 * 4 \n</answer>") == "7/2*4"
  assert countdown.extract_answer("\n\n") is None


# ----------------------------------------------------------------------------------------------
# Math extraction.


def test_boxed_extraction():
  assert math_tasks.last_boxed("x = \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
  assert math_tasks.last_boxed("\\boxed{1} then \\boxed{\\sqrt{2}} wins") == "\\sqrt{2}"
  assert math_tasks.last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
  assert math_tasks.last_boxed("so $\\boxed 5$.") == "5"
  assert math_tasks.last_boxed("\\fbox{7}") == "7"
  # A truncated last box falls back to the last complete one.
  assert math_tasks.last_boxed("\\boxed{3} and then \\boxed{\\frac{1}{") == "3"
  assert math_tasks.last_boxed("\\boxed{}") is None
  assert math_tasks.last_boxed("no box here") is None


def test_math_answer_extraction_order():
  assert math_tasks.extract_answer("math", "<answer>7</answer> \\boxed{8}") == "8"
  assert math_tasks.extract_answer("math", "reasoning <answer> 7 </answer>") == "7"
  assert math_tasks.extract_answer("gsm8k", "5 + 13 = 18\n#### 1,018") == "1018"
  assert math_tasks.extract_answer("math", "5 + 13 = 18\n#### 18") is None  # GSM8K form only.
  assert math_tasks.extract_answer("gsm8k", "The answer is 18.") is None
  assert math_tasks.extract_answer("gsm8k", "\\boxed{\\$1,250}") == "1250"


def test_math_rewards_by_equivalence():
  golds = ["\\frac{1}{2}", "\\frac{1}{2}", "18", "18", "x^2+1", "3", "3", "4.5e33"]
  completions = [
    "so it is \\boxed{0.5}.",
    "first \\boxed{\\frac{1}{2}} but actually \\boxed{\\frac{1}{3}}",  # Last box wins.
    "She makes \\boxed{18 \\text{ dollars}}.",
    "#### 18",  # The #### form is GSM8K-only; this is a MATH problem.
    "\\boxed{1 + x^2}",
    "I am not sure.",  # No answer -> 0.
    "\\boxed{\\frac{}{",  # Garbage -> 0, no exception.
    "L = \\boxed{4.5 \\times 10^{33}} erg/s",
  ]
  task_names = ["math", "math", "gsm8k", "math", "math", "math", "math", "math"]
  scores = math_tasks.rewards(task_names, golds, completions)
  assert scores == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]


def _as_float(text: str) -> float | None:
  try:
    return float(text)
  except ValueError:
    return None


def _perturbed(gold: str) -> str:
  return str(decimal.Decimal(gold) + 1)


def test_gsm8k_every_test_answer_verifies_and_perturbed_fails():
  path = _data_file("gsm8k", "test.jsonl")
  problems = tasks.load("gsm8k", path=str(path))
  assert len(problems) == 1319 and problems[17].id == "gsm8k/test/17"
  assert tasks.format_prompt(problems[0]).endswith(problems[0].prompt + "\n")
  assert "\\boxed{}" in tasks.format_prompt(problems[0])
  right = [f"... so the answer is \\boxed{{{p.reference}}}." for p in problems]
  wrong = [f"... so the answer is \\boxed{{{_perturbed(p.reference)}}}." for p in problems]
  tasks.rewards(problems[:2], right[:2])  # Starts the worker pool outside the timing.
  start = time.perf_counter()
  scores = tasks.rewards(problems + problems, right + wrong)
  seconds = time.perf_counter() - start
  print(f"math_verify through rewards: {2 * len(problems) / seconds:.0f} answers/s")
  assert [p.id for p, s in zip(problems, scores[: len(problems)]) if s != 1.0] == []
  assert [p.id for p, s in zip(problems, scores[len(problems) :]) if s != 0.0] == []


def test_minerva_math_solutions_verify_against_themselves():
  path = _data_file("minerva_math", "test.jsonl")
  problems = tasks.load("math", path=str(path))
  solutions = [json.loads(line)["solution"] for line in path.read_text().splitlines()]
  assert len(problems) == len(solutions) == 272
  scores = tasks.rewards(problems, solutions)
  failures = [(p.id, p.reference) for p, s in zip(problems, scores) if s != 1.0]
  assert failures == []
  # A negative control: numeric answers changed by a factor of 2 do not verify.
  numeric = [(p, _as_float(p.reference)) for p in problems]
  numeric = [(p, value) for p, value in numeric if value is not None]
  assert len(numeric) > 100
  wrong = [f"\\boxed{{{2 * value + 1:g}}}" for _, value in numeric]
  assert sum(tasks.rewards([p for p, _ in numeric], wrong)) == 0.0


def test_math_loader_errors_name_file_and_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"problem": "1+1?", "solution": "\\boxed{2}"}) + "\n{not json\n")
  with pytest.raises(ValueError, match=r"bad.jsonl, line 2: invalid JSON"):
    tasks.load("math", path=str(path))
  path.write_text(json.dumps({"problem": "1+1?", "solution": "it is 2"}) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl, line 1: solution has no \\boxed"):
    tasks.load("math", path=str(path))
  path.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
  with pytest.raises(ValueError, match=r"line 1: answer has no '####"):
    tasks.load("gsm8k", path=str(path))
  with pytest.raises(ValueError, match=r"line 1: missing field 'problem'"):
    tasks.load("math", path=str(path))
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    tasks.load("gsm8k", path=str(tmp_path / "nope.jsonl"))


# ----------------------------------------------------------------------------------------------
# The worker pool under a hanging verification.


def _verify_or_hang(gold: str, answer: str, timeout_s: int) -> bool:
  # Runs in a worker process: stands in for a sympy parse that never returns.
  if answer == "999":
    time.sleep(120)
  return math_tasks.verify_answer(gold, answer, timeout_s)


def test_math_timeout_scores_zero_and_the_next_call_works():
  completions = ["\\boxed{999}", "\\boxed{5}", "\\boxed{7}", "\\boxed{2}"]
  golds = ["999", "5", "8", "2"]
  start = time.perf_counter()
  scores = math_tasks.rewards(
    ["math"] * 4, golds, completions, timeout_s=3.0, workers=2, verify_fn=_verify_or_hang
  )
  assert scores == [0.0, 1.0, 0.0, 1.0]
  assert time.perf_counter() - start < 60
  assert math_tasks.rewards(["math", "math"], ["2", "3"], ["\\boxed{2}", "\\boxed{2}"]) == [
    1.0,
    0.0,
  ]


def _verify_or_crash(gold: str, answer: str, timeout_s: int) -> bool:
  # Stands in for a worker killed mid-item (e.g. by the out-of-memory killer).
  if answer == "666":
    os._exit(1)
  return math_tasks.verify_answer(gold, answer, timeout_s)


def test_math_worker_crash_scores_zero_and_spares_the_rest():
  completions = ["\\boxed{1}", "\\boxed{666}", "\\boxed{3}", "\\boxed{5}"]
  golds = ["1", "666", "3", "4"]
  scores = math_tasks.rewards(
    ["math"] * 4, golds, completions, timeout_s=5.0, workers=2, verify_fn=_verify_or_crash
  )
  assert scores == [1.0, 0.0, 1.0, 0.0]
  assert math_tasks.rewards(["math"], ["2"], ["\\boxed{2}"]) == [1.0]


# ----------------------------------------------------------------------------------------------
# Code.


def _exec_runner(items):
  """A fake sandbox for trusted test programs: exec in-process, pass iff nothing raises."""

  class Result:
    def __init__(self, passed):
      self.passed = passed

  results = []
  for program, tests in items:
    try:
      exec(compile(program + "\n" + tests, "<program>", "exec"), {"__name__": "program"})
      results.append(Result(True))
    except Exception:
      results.append(Result(False))
  return results


WRONG_BODY = "    return False\n"


def test_humaneval_program_assembly_with_fake_runner():
  problems = tasks.load("humaneval")
  assert len(problems) == 164
  problem = problems[0]
  assert problem.id == "HumanEval/0" and tasks.format_prompt(problem) == problem.prompt
  canonical = problem.reference["canonical_solution"]
  whole = "Here it is:\n```python\ndef has_close_elements(numbers, threshold):\n" + (
    "    return any(abs(a - b) < threshold for i, a in enumerate(numbers)"
    " for j, b in enumerate(numbers) if i != j)\n```\nDone."
  )
  trailing = canonical + "\n\nprint(has_close_elements([1.0], 0.5))\nassert False\n"
  completions = [canonical, WRONG_BODY, whole, trailing, "   \n", "def nope(:"]
  scores = code.rewards([problem] * len(completions), completions, run_many=_exec_runner)
  assert scores == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
  assert tasks.extract_answer(problem, canonical) == problem.prompt + canonical


@pytest.mark.skipif(not _has_sandbox(), reason="trafl_jax.sandbox is not importable")
def test_humaneval_through_the_real_sandbox():
  problem = tasks.load("humaneval", limit=1)[0]
  canonical = problem.reference["canonical_solution"]
  assert tasks.rewards([problem, problem], [canonical, WRONG_BODY]) == [1.0, 0.0]


def test_mbpp_loader_prompt_and_rewards(tmp_path):
  rows = [
    {
      "task_id": 11,
      "text": "Write a function to add two numbers.",
      "code": "def add(a, b):\n  return a + b",
      "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"],
      "test_setup_code": "",
    },
    {
      "task_id": 12,
      "text": "Write a function to compute the square root of a number.",
      "code": "def root(x):\n  return math.sqrt(x)",
      "test_list": ["assert root(4) == 2"],
      "test_setup_code": "import math",
    },
  ]
  path = tmp_path / "mbpp.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  problems = tasks.load("mbpp", path=str(path))
  assert [p.id for p in problems] == ["mbpp/11", "mbpp/12"]
  assert problems[0].reference["entry_point"] == "add"
  prompt = tasks.format_prompt(problems[0])
  assert rows[0]["text"] in prompt and "assert add(1, 2) == 3" in prompt
  assert "assert add(-1, 1) == 0" not in prompt  # One test as the example, the rest held out.
  fenced = "Sure.\n```python\nimport math\ndef root(x):\n    return math.sqrt(x)\n```\n"
  completions = [rows[0]["code"], "def add(a, b):\n  return a - b", fenced, "no code here, sorry"]
  scores = code.rewards(
    [problems[0], problems[0], problems[1], problems[1]], completions, run_many=_exec_runner
  )
  assert scores == [1.0, 0.0, 1.0, 0.0]
  assert (
    tasks.extract_answer(problems[1], fenced)
    == "import math\ndef root(x):\n    return math.sqrt(x)\n"
  )


def test_mbpp_loader_errors(tmp_path):
  path = tmp_path / "mbpp.jsonl"
  path.write_text(json.dumps({"task_id": 1, "text": "x", "test_list": "assert f()"}) + "\n")
  with pytest.raises(ValueError, match=r"mbpp.jsonl, line 1: field 'test_list' has type str"):
    tasks.load("mbpp", path=str(path))
  path.write_text("\n" + json.dumps({"task_id": 1, "test_list": ["assert f()"]}) + "\n")
  with pytest.raises(ValueError, match=r"mbpp.jsonl, line 2: needs a non-empty string 'text'"):
    tasks.load("mbpp", path=str(path))
  path.write_text("")
  with pytest.raises(ValueError, match="no records"):
    tasks.load("mbpp", path=str(path))


def test_mixed_batch_dispatch():
  cd = tasks.Problem("countdown", "c", "", {"numbers": [2, 3], "target": 6})
  gsm = tasks.Problem("gsm8k", "g", "q", "42")
  mth = tasks.Problem("math", "m", "q", "\\frac{1}{2}")
  problems = [cd, gsm, mth, cd, gsm, mth]
  completions = ["2*3", "#### 42", "\\boxed{1/2}", "2+3", "#### 41", "\\boxed{2}"]
  assert tasks.rewards(problems, completions) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
  assert [tasks.extract_answer(p, c) for p, c in zip(problems[:3], completions[:3])] == [
    "2*3",
    "42",
    "1/2",
  ]
  with pytest.raises(ValueError, match="2 problems but 1 completions"):
    tasks.rewards([cd, cd], ["2*3"])
