"""Math tasks: GSM8K, MATH-format files (MATH500) and Minerva Math.

Prompt: reason step by step, final answer in `\\boxed{}`. Extraction: the last well-formed `\\boxed{}`
(or `\\boxed x`, `\\fbox{}`), else the last `<answer>...</answer>`, else (GSM8K) the number after
`####`. Reward: 1 iff the extracted answer is mathematically equivalent to the gold answer under
`math_verify` (sympy parse + comparison), never a string match.

Verification runs in a pool of worker processes, because a sympy parse or simplification can take
unbounded time on an adversarial completion and must not stall training: every item gets a
wall-clock timeout, a timed out item scores 0 and the pool is replaced (its hung worker killed).
The pool is started with "spawn" (the parent runs JAX threads, so "fork" is unsafe), kept across
calls so the start cost is paid once, and closed at exit.

Dimension legend: none (pure Python, no arrays).
"""

import atexit
import concurrent.futures
import contextlib
import functools
import multiprocessing
import os
import re
import sys
import threading
import types
from collections.abc import Callable, Sequence
from concurrent.futures import process as futures_process
from typing import Any

from trafl_jax.tasks import base

PROMPT_PREFIX = "Solve the following problem step by step. Put the final answer in \\boxed{}.\n\n"

# Enough workers to keep up with a rollout batch (one verifies ~1,500 GSM8K answers/s); more would
# only multiply the ~60 MB each sympy-importing process holds on hosts with hundreds of cores.
MAX_DEFAULT_WORKERS = 16
# A worker crash fails every queued item; each innocent item is retried this many times in total.
_MAX_ATTEMPTS = 3
# Starting a spawned worker imports sympy (well under a second here); this bounds a stuck start.
_START_TIMEOUT_S = 120.0

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_HASHES_RE = re.compile(r"####\s*([^\n]*)")
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
# 4.5e33 -> 4.5\times10^{33}: math_verify reads "e" as Euler's number times 33.
_SCIENTIFIC_RE = re.compile(r"(?<![A-Za-z\\])(\d+(?:\.\d+)?)[eE]([+-]?\d+)(?![A-Za-z])")
# "$18", "18 dollars", "25\%", "3 \text{ apples}.": GSM8K golds are plain numbers, and math_verify
# reads trailing words as a product of symbols.
_GSM8K_NUMBER_RE = re.compile(
  r"\\?\$?\s*(-?[\d,]*\.?\d+)\s*(?:\\?%)?\s*"
  r"(?:\\(?:text|mbox|mathrm)\s*\{[^{}]*\}|[A-Za-z][A-Za-z ]*)?\s*\.?"
)


# ----------------------------------------------------------------------------------------------
# Prompts and extraction.


def format_prompt(question: str) -> str:
  return PROMPT_PREFIX + question.strip() + "\n"


def _braced_argument(text: str, start: int) -> str | None:
  """Content of the `{...}` group opening at `text[start]`; None if it never closes."""
  depth = 0
  i = start
  while i < len(text):
    char = text[i]
    if char == "\\":
      # Escaped braces (\{ \}) and \\ are content, not grouping.
      i += 2
      continue
    if char == "{":
      depth += 1
    elif char == "}":
      depth -= 1
      if depth == 0:
        return text[start + 1 : i]
    i += 1
  return None


def last_boxed(text: str) -> str | None:
  """Content of the last well-formed `\\boxed{...}` / `\\fbox{...}` / `\\boxed x`, else None.

  A truncated last box (completion cut off before its closing brace) is skipped in favour of an
  earlier complete one.
  """
  for match in reversed(list(_BOXED_RE.finditer(text))):
    pos = match.end()
    while pos < len(text) and text[pos] in " \t":
      pos += 1
    if pos < len(text) and text[pos] == "{":
      content = _braced_argument(text, pos)
    else:
      # "\boxed 5$" (the MATH dataset's unbraced form): the argument runs to a space or `$`.
      content = re.match(r"[^\s$]*", text[pos:]).group(0) if match.end() < pos else None
    if content is not None and content.strip():
      return content.strip()
  return None


def answer_tag(text: str) -> str | None:
  """Content of the last `<answer>...</answer>`, stripped; None if absent or empty."""
  found = [m.strip() for m in _ANSWER_TAG_RE.findall(text)]
  found = [m for m in found if m]
  return found[-1] if found else None


def _after_hashes(text: str) -> str | None:
  found = _HASHES_RE.findall(text)
  if not found:
    return None
  number = _NUMBER_RE.search(found[-1])
  return number.group(0).replace(",", "") if number else None


def _normalize(answer: str, task: str) -> str:
  answer = answer.strip()
  # The length bound keeps the regex's backtracking cheap on a pathological answer.
  if task == "gsm8k" and len(answer) <= 100:
    match = _GSM8K_NUMBER_RE.fullmatch(answer)
    if match:
      answer = match.group(1)
  if _THOUSANDS_RE.fullmatch(answer):
    answer = answer.replace(",", "")
  return _SCIENTIFIC_RE.sub(r"\1\\times10^{\2}", answer)


def extract_answer(task: str, completion: str) -> str | None:
  """The final answer string of a completion for `task` ("gsm8k" or "math"), or None."""
  answer = last_boxed(completion)
  if answer is None:
    answer = answer_tag(completion)
  if answer is None and task == "gsm8k":
    answer = _after_hashes(completion)
  if answer is None:
    return None
  answer = _normalize(answer, task)
  return answer or None


# ----------------------------------------------------------------------------------------------
# Loading.


def load_gsm8k(split: str = "test", path: str | None = None) -> list[base.Problem]:
  """GSM8K JSONL (`question`, `answer` ending `#### N`) from `path`, else `openai/gsm8k`."""
  if path is None:
    rows = base.hf_rows("openai/gsm8k", split, config="main")
  else:
    rows = base.read_jsonl(path, {"question": str, "answer": str})
  problems = []
  for i, (where, row) in enumerate(rows):
    gold = _after_hashes(row["answer"])
    if gold is None:
      raise ValueError(f"{where}: answer has no '#### <number>' line: {row['answer'][-80:]!r}")
    problems.append(
      base.Problem(task="gsm8k", id=f"gsm8k/{split}/{i}", prompt=row["question"], reference=gold)
    )
  return problems


def load_math(split: str = "test", path: str | None = None) -> list[base.Problem]:
  """MATH-format JSONL (`problem`, `solution` with `\\boxed{}`): MATH500, Minerva Math.

  Without a path, loads `HuggingFaceH4/MATH-500` (test split only). The gold answer is the last
  `\\boxed{}` of the solution, or the row's `answer` field when the solution has none.
  """
  if path is None:
    rows = base.hf_rows("HuggingFaceH4/MATH-500", split)
  else:
    rows = base.read_jsonl(path, {"problem": str, "solution": str})
  problems = []
  for i, (where, row) in enumerate(rows):
    gold = last_boxed(row["solution"])
    if gold is None and isinstance(row.get("answer"), str) and row["answer"].strip():
      gold = row["answer"].strip()
    if gold is None:
      raise ValueError(
        f"{where}: solution has no \\boxed{{}} answer and there is no 'answer' field"
      )
    problems.append(
      base.Problem(task="math", id=f"math/{split}/{i}", prompt=row["problem"], reference=gold)
    )
  return problems


# ----------------------------------------------------------------------------------------------
# Verification (runs inside worker processes; in-process use is fine too).


def _math_verify_timeout(seconds: int) -> int | None:
  # math_verify's own timeout uses SIGALRM, which only the main thread may set.
  return seconds if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout: int | None) -> tuple:
  # Cached: during training every gold answer is checked against G samples in a row.
  import math_verify

  parsed = math_verify.parse("\\boxed{" + gold + "}", parsing_timeout=timeout)
  if not parsed:
    parsed = math_verify.parse("$" + gold + "$", parsing_timeout=timeout)
  return tuple(parsed)


def verify_answer(gold: str, answer: str, timeout_s: int = 5) -> bool:
  """True iff `answer` is mathematically equivalent to `gold` (both extracted answer strings)."""
  import math_verify

  timeout = _math_verify_timeout(max(1, int(timeout_s)))
  try:
    gold_parsed = _parse_gold(gold, timeout)
    if not gold_parsed:
      return False
    pred = math_verify.parse("\\boxed{" + answer + "}", parsing_timeout=timeout)
    if not pred:
      # Free text (e.g. from an answer tag): let math_verify find the expression in it.
      pred = math_verify.parse(answer, parsing_timeout=timeout)
    if not pred:
      return False
    return bool(math_verify.verify(list(gold_parsed), pred, timeout_seconds=timeout))
  except Exception:  # A malformed completion scores 0; it must never stop training.
    return False


def _init_worker() -> None:
  # Pay sympy's import and first-parse cost at pool start, not inside the first item's timeout.
  verify_answer("1", "1")


def _ready() -> int:
  return os.getpid()


# ----------------------------------------------------------------------------------------------
# The worker pool.

_pool: concurrent.futures.ProcessPoolExecutor | None = None
_pool_workers = 0
_pool_lock = threading.Lock()


def default_workers() -> int:
  return max(1, min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1))


@contextlib.contextmanager
def _stand_in_main():
  """Hides the parent's `__main__` from spawned children, which would otherwise re-import it.

  That import would pull JAX into every worker (`python -m trafl_jax.main`) or rerun an unguarded
  script's top level; verification needs neither, so children see an empty `__main__`. Functions
  sent to the workers must therefore live in importable modules.
  """
  main = sys.modules["__main__"]
  sys.modules["__main__"] = types.ModuleType("__main__")
  try:
    yield
  finally:
    sys.modules["__main__"] = main


def _get_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
  global _pool, _pool_workers
  if _pool is not None and _pool_workers == workers:
    return _pool
  close_pool()
  pool = concurrent.futures.ProcessPoolExecutor(
    max_workers=workers,
    mp_context=multiprocessing.get_context("spawn"),
    initializer=_init_worker,
  )
  # Workers are spawned one per submit while none is idle, so this starts all of them now (and
  # none later, so the stand-in __main__ covers every worker).
  with _stand_in_main():
    ready = [pool.submit(_ready) for _ in range(workers)]
  done, not_done = concurrent.futures.wait(ready, timeout=_START_TIMEOUT_S)
  errors = [f.exception() for f in done if f.exception() is not None]
  if errors or not_done:
    _pool = pool
    close_pool()
    reason = repr(errors[0]) if errors else f"not ready after {_START_TIMEOUT_S:.0f} s"
    raise RuntimeError(f"Math verification workers failed to start: {reason}")
  _pool, _pool_workers = pool, workers
  return pool


def close_pool() -> None:
  """Stops the worker pool (killing any hung worker); the next call starts a fresh one."""
  global _pool, _pool_workers
  pool, _pool, _pool_workers = _pool, None, 0
  if pool is None:
    return
  # ProcessPoolExecutor (before Python 3.14) cannot stop a running task, so a worker stuck in a
  # sympy parse is killed through the executor's process table.
  processes = list((getattr(pool, "_processes", None) or {}).values())
  pool.shutdown(wait=False, cancel_futures=True)
  for proc in processes:
    if proc.is_alive():
      proc.kill()
  for proc in processes:
    proc.join(timeout=5)


atexit.register(close_pool)


def map_with_timeout(
  fn: Callable[..., Any], jobs: Sequence[tuple], timeout_s: float, workers: int | None = None
) -> list[Any]:
  """`[fn(*job) for job in jobs]` in the worker pool; None where a job timed out or failed.

  Each job gets `timeout_s` seconds of waiting once the jobs before it are collected (jobs start
  in order, so that is at least `timeout_s` of running time). A timeout kills the pool, keeps the
  results already finished, and reruns the rest in a fresh pool. `fn` must be picklable (a
  module-level function of an importable module).
  """
  workers = default_workers() if workers is None else max(1, int(workers))
  results: list[Any] = [None] * len(jobs)
  attempts = [0] * len(jobs)
  pending = list(range(len(jobs)))
  with _pool_lock:
    while pending:
      pool = _get_pool(workers)
      futures: dict[int, concurrent.futures.Future] = {}
      # After a pool broke, the culprit is unknown: rerun one job per pool so that a job that kills
      # its worker again cannot take bystanders down with it (they would run out of attempts).
      batch = pending if not any(attempts[i] for i in pending) else pending[:1]
      retry: list[int] = pending[len(batch) :]
      for n, i in enumerate(batch):
        try:
          futures[i] = pool.submit(fn, *jobs[i])
        except futures_process.BrokenProcessPool:
          # A worker died while we were still submitting; the rest go to the next pool.
          retry.extend(batch[n:])
          break
        attempts[i] += 1
      broken = False
      for i, future in futures.items():
        if broken:
          # The pool is gone: keep what finished before it went, rerun the rest.
          if not future.done() or future.cancelled():
            failed = True
          else:
            error = future.exception()
            failed = isinstance(error, futures_process.BrokenProcessPool)
            if error is None:
              results[i] = future.result()
          if failed and attempts[i] < _MAX_ATTEMPTS:
            retry.append(i)
          continue
        try:
          results[i] = future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
          # This job hung: it keeps None, and its worker must die with the pool.
          close_pool()
          broken = True
        except futures_process.BrokenProcessPool:
          # A worker died (e.g. out of memory); the culprit is unknown, so everyone is retried.
          close_pool()
          broken = True
          if attempts[i] < _MAX_ATTEMPTS:
            retry.append(i)
        except Exception:  # `fn` itself raised: this job has no result.
          pass
      if not broken and retry:
        close_pool()
      pending = sorted(retry)
  return results


def rewards(
  task_names: Sequence[str],
  golds: Sequence[str],
  completions: Sequence[str],
  timeout_s: float = 10.0,
  workers: int | None = None,
  verify_fn: Callable[[str, str, int], bool] = verify_answer,
) -> list[float]:
  """1.0 where the completion's final answer is equivalent to the gold answer, else 0.0.

  `verify_fn(gold, answer, inner_timeout_s)` must be a picklable module-level function; it is a
  parameter so tests can inject a hanging verification.
  """
  scores = [0.0] * len(completions)
  jobs, owners = [], []
  # math_verify's own per-operation timeout (three operations per item) stops most slow parses
  # gracefully; the pool's wall-clock timeout is the backstop for what it cannot interrupt.
  inner_timeout = max(1, int(timeout_s / 3))
  for i, (task, gold, completion) in enumerate(zip(task_names, golds, completions)):
    answer = extract_answer(task, completion)
    if answer is not None and gold:
      # The gold gets the same normalisation as the answer (e.g. Minerva's "4.5e33").
      jobs.append((_normalize(gold, task), answer, inner_timeout))
      owners.append(i)
  for i, ok in zip(owners, map_with_timeout(verify_fn, jobs, timeout_s, workers)):
    scores[i] = 1.0 if ok is True else 0.0
  return scores
