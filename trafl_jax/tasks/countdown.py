"""Seeded generator, solver and checker for Countdown arithmetic problems.

A problem is a multiset of small positive integers and a target; a solution is a flat expression
`a op b op c ...` that uses every number exactly once (any order), ops in + - * /, standard
precedence, no parentheses. All arithmetic is exact rational arithmetic; nothing is `eval`ed.

This is the default training / evaluation data, so the main job needs no download.

Dimension legend: none (pure Python, no arrays).
"""

import fractions
import functools
import hashlib
import itertools
import random
import re
from collections.abc import Sequence

Fraction = fractions.Fraction

OPS = ("+", "-", "*", "/")

# One token per match: an integer, or any single non-space character (validated by the parser).
_TOKEN_RE = re.compile(r"\s*(?:(\d+)|(\S))")


def prompt_for(numbers: Sequence[int], target: int) -> str:
  """The exact prompt string for a problem (numbers in the given order)."""
  return f"Numbers: {' '.join(map(str, numbers))}. Target: {target}.\n"


def _eval_flat(numbers: Sequence[int], ops: Sequence[str]) -> tuple[int, int] | None:
  """Evaluates `n0 op0 n1 op1 n2 ...` (* and / bind tighter) as an unreduced (num, den) pair.

  Plain integer pairs instead of `Fraction` because the solver evaluates every permutation x
  operator combination for every generated problem and gcd normalisation dominated the cost.
  """
  total_num, total_den = 0, 1
  term_num, term_den, sign = numbers[0], 1, 1
  for op, n in zip(ops, numbers[1:]):
    if op == "*":
      term_num *= n
    elif op == "/":
      if n == 0:
        return None
      term_num, term_den = term_num * (1 if n > 0 else -1), term_den * abs(n)
    else:
      total_num = total_num * term_den + sign * term_num * total_den
      total_den *= term_den
      term_num, term_den, sign = n, 1, (1 if op == "+" else -1)
  total_num = total_num * term_den + sign * term_num * total_den
  return total_num, total_den * term_den


def _format(numbers: Sequence[int], ops: Sequence[str]) -> str:
  parts = [str(numbers[0])]
  for op, n in zip(ops, numbers[1:]):
    parts.append(op)
    parts.append(str(n))
  return "".join(parts)


def solutions(numbers: Sequence[int], target: int) -> list[str]:
  """All distinct flat expressions over a permutation of `numbers` that equal `target`.

  Order is deterministic (permutation order, then operator order), so seeded sampling from the
  result is reproducible.
  """
  numbers = [int(n) for n in numbers]
  if not numbers:
    return []
  found: dict[str, None] = {}  # Insertion-ordered set.
  seen_orders: set[tuple[int, ...]] = set()
  for order in itertools.permutations(numbers):
    # Repeated numbers give repeated permutations; skip them instead of re-evaluating.
    if order in seen_orders:
      continue
    seen_orders.add(order)
    for ops in itertools.product(OPS, repeat=len(numbers) - 1):
      value = _eval_flat(order, ops)
      if value is not None and value[0] == target * value[1]:
        found.setdefault(_format(order, ops), None)
  return list(found)


# A fixed partition of the problem space by a stable hash of (sorted numbers, target): the reference's SFT
# data, the post-training prompts and the held-out test never share a problem, whatever the seeds.
SPLITS = (("test", 0.2), ("train", 0.3), ("sft", 0.5))  # (split, fraction), in hash-bucket order


def split_of(numbers: Sequence[int], target: int) -> str:
  """ "sft" (reference training data), "train" (post-training prompts) or "test" (held out)."""
  key = ",".join(map(str, sorted(numbers))) + f"->{target}"
  bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") / 2**32
  edge = 0.0
  for name, fraction in SPLITS:
    edge += fraction
    if bucket < edge:
      return name
  return SPLITS[-1][0]


def problem_key(numbers: Sequence[int], target: int) -> str:
  """A problem's identity: its numbers as a multiset and its target (`3,7,12->33`)."""
  return ",".join(map(str, sorted(numbers))) + f"->{target}"


@functools.cache
def problem_space(num_numbers: int, max_number: int) -> tuple[tuple[tuple[int, ...], int], ...]:
  """Every distinct problem `(sorted numbers, target)` with numbers in [1, max_number] and a positive
  integer target some flat expression reaches, in a fixed order."""
  out = []
  for numbers in itertools.combinations_with_replacement(range(1, max_number + 1), num_numbers):
    targets = set()
    for order in set(itertools.permutations(numbers)):
      for ops in itertools.product(OPS, repeat=num_numbers - 1):
        value = _eval_flat(order, ops)
        if value is not None and value[0] > 0 and value[0] % value[1] == 0:
          targets.add(value[0] // value[1])
    out += [(numbers, t) for t in sorted(targets)]
  return tuple(out)


def _draw(rng: random.Random, num_numbers: int, max_number: int) -> tuple[list[int], int] | None:
  """One draw of the generator: random numbers, a random expression over them; `(numbers, target)`
  when its value is a positive integer, else None."""
  numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
  order = rng.sample(numbers, len(numbers))
  ops = [rng.choice(OPS) for _ in range(num_numbers - 1)]
  value = _eval_flat(order, ops)
  # Denominators stay positive, so the sign test on the numerator is valid.
  if value is None or value[0] <= 0 or value[0] % value[1]:
    return None
  return numbers, value[0] // value[1]


def _problem(numbers: Sequence[int], target: int, rng: random.Random) -> dict:
  """The record of a problem, its answer drawn uniformly among its solutions."""
  answer = rng.choice(solutions(numbers, target))
  return {
    "prompt": prompt_for(numbers, target),
    "answer": answer,
    "numbers": list(numbers),
    "target": target,
  }


def distinct(
  num_problems: int | None,
  seed: int,
  split: str,
  num_numbers: int = 3,
  max_number: int = 20,
) -> list[dict]:
  """`num_problems` distinct problems of `split` (None: all of them, from `problem_space`), each once.

  They are the first distinct ones of the generator's seeded stream, so a smaller set is a prefix of
  a larger one with the same seed (an evaluation probe of post-training prompts is a subset of them).
  Problems the stream rarely reaches are taken from the enumerated space when the stream runs long.
  Asking for more than the split holds is an error naming how many it holds."""
  if split not in dict(SPLITS):
    raise ValueError(f"countdown split must be one of {[n for n, _ in SPLITS]}, got {split!r}")
  if num_problems is None:
    space = [p for p in problem_space(num_numbers, max_number) if split_of(*p) == split]
    num_problems = len(space)
  rng = random.Random(f"countdown/{split}/{seed}")
  seen, out = set(), []
  for _ in range(50 * num_problems + 1000):
    if len(out) == num_problems:
      return out
    drawn = _draw(rng, num_numbers, max_number)
    if drawn is None or split_of(*drawn) != split or problem_key(*drawn) in seen:
      continue
    seen.add(problem_key(*drawn))
    out.append(_problem(*drawn, rng))
  rest = [
    (list(n), t)
    for n, t in problem_space(num_numbers, max_number)
    if split_of(n, t) == split and problem_key(n, t) not in seen
  ]
  if len(out) + len(rest) < num_problems:
    raise ValueError(
      f"countdown split {split!r} holds {len(out) + len(rest)} distinct problems ({num_numbers} "
      f"numbers in 1..{max_number}), fewer than the {num_problems} asked for"
    )
  rng.shuffle(rest)
  return out + [_problem(n, t, rng) for n, t in rest[: num_problems - len(out)]]


def generate(
  num_problems: int,
  seed: int,
  num_numbers: int = 3,
  max_number: int = 20,
  split: str | None = None,
) -> list[dict]:
  """Generates `num_problems` solvable problems deterministically from `seed`, repeats allowed (the
  reference's SFT data: a problem drawn again gets another of its answers); with `split`, only problems
  of that part of the fixed partition (`split_of`). `distinct` gives sets without repeats.

  Each problem draws `num_numbers` integers uniformly in [1, max_number], applies a random
  permutation and random operators, and keeps the result as target if it is a positive integer.
  The answer is drawn uniformly among all correct expressions, so it is not biased towards the
  expression that produced the target.

  Returns:
    A list of `{"prompt": str, "answer": str, "numbers": list[int], "target": int}`.
  """
  if num_problems < 0:
    raise ValueError(f"num_problems must be >= 0, got {num_problems}")
  if num_numbers < 1:
    raise ValueError(f"num_numbers must be >= 1, got {num_numbers}")
  if max_number < 1:
    raise ValueError(f"max_number must be >= 1, got {max_number}")
  if split is not None and split not in dict(SPLITS):
    raise ValueError(f"countdown split must be one of {[n for n, _ in SPLITS]}, got {split!r}")
  rng = random.Random(seed)
  problems = []
  while len(problems) < num_problems:
    drawn = _draw(rng, num_numbers, max_number)
    if drawn is None or (split is not None and split_of(*drawn) != split):
      continue
    problems.append(_problem(*drawn, rng))
  return problems


def _tokenize(expr: str) -> list[str] | None:
  """Splits into integer / operator / parenthesis tokens; None on any other character."""
  tokens = []
  pos = 0
  expr = expr.rstrip()
  while pos < len(expr):
    match = _TOKEN_RE.match(expr, pos)
    if match is None:
      return None
    number, symbol = match.groups()
    if symbol is not None and symbol not in "+-*/()":
      return None
    tokens.append(number if number is not None else symbol)
    pos = match.end()
  return tokens


class _Parser:
  """Recursive-descent parser: expr := term (+|- term)*; term := atom (*|/ atom)*.

  atom := INT | '(' expr ')'. No unary operators: Countdown answers never need them, and
  rejecting them keeps the grammar (and the reward) strict.
  """

  def __init__(self, tokens: list[str]):
    self.tokens = tokens
    self.pos = 0

  def peek(self) -> str | None:
    return self.tokens[self.pos] if self.pos < len(self.tokens) else None

  def take(self) -> str | None:
    token = self.peek()
    self.pos += 1
    return token

  def expr(self) -> Fraction:
    value = self.term()
    while self.peek() in ("+", "-"):
      op = self.take()
      rhs = self.term()
      value = value + rhs if op == "+" else value - rhs
    return value

  def term(self) -> Fraction:
    value = self.atom()
    while self.peek() in ("*", "/"):
      op = self.take()
      rhs = self.atom()
      if op == "*":
        value *= rhs
      else:
        # ZeroDivisionError is mapped to None by the caller.
        value /= rhs
    return value

  def atom(self) -> Fraction:
    token = self.take()
    if token is None:
      raise ValueError("unexpected end of expression")
    if token.isdigit():
      return Fraction(int(token))
    if token == "(":
      value = self.expr()
      if self.take() != ")":
        raise ValueError("unbalanced parenthesis")
      return value
    raise ValueError(f"unexpected token {token!r}")


def evaluate_expression(expr: str) -> Fraction | None:
  """Exact value of an integer arithmetic expression, or None if malformed / divides by zero."""
  tokens = _tokenize(expr)
  if not tokens:
    return None
  parser = _Parser(tokens)
  try:
    value = parser.expr()
  except (ValueError, ZeroDivisionError, RecursionError):
    return None
  if parser.pos != len(tokens):
    return None
  return value


def is_correct(expr: str, numbers: Sequence[int], target: int) -> bool:
  """True iff `expr` uses exactly the multiset `numbers` and evaluates to `target`."""
  tokens = _tokenize(expr)
  if not tokens:
    return False
  used = sorted(int(t) for t in tokens if t.isdigit())
  if used != sorted(int(n) for n in numbers):
    return False
  value = evaluate_expression(expr)
  return value is not None and value == target


# ----------------------------------------------------------------------------------------------
# Answer extraction for model completions.

_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# Countdown expressions contain no braces, so one flat group is enough.
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{([^{}]*)\}")
_LATEX_OPS = (("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"), ("×", "*"), ("÷", "/"))
_SPACED_OP_RE = re.compile(r"\s*([-+*/()])\s*")


def extract_answer(completion: str) -> str | None:
  """The expression a completion answers with, or None.

  The last `<answer>...</answer>` if present, else the last `\\boxed{}`, else the first non-empty
  line. LaTeX operators become `* /` and spaces around operators are dropped, so the string is a
  canonical form for counting distinct answers; anything else (e.g. `= 33`) is kept and makes the
  answer wrong, as the prompt format asks for the bare expression.
  """
  tagged = [m for m in _ANSWER_TAG_RE.findall(completion) if m.strip()]
  text = tagged[-1] if tagged else completion
  boxed = [m for m in _BOXED_RE.findall(text) if m.strip()]
  if boxed:
    answer = boxed[-1]
  elif tagged:
    answer = tagged[-1]
  else:
    lines = [line for line in completion.strip().split("\n") if line.strip()]
    if not lines:
      return None
    answer = lines[0]
  for latex, op in _LATEX_OPS:
    answer = answer.replace(latex, op)
  answer = _SPACED_OP_RE.sub(r"\1", answer.strip().strip("$").strip())
  return answer or None


def reward(completion: str, numbers: Sequence[int], target: int) -> float:
  """1.0 iff the completion's expression uses exactly `numbers` and equals `target`, else 0.0."""
  answer = extract_answer(completion)
  return 1.0 if answer is not None and is_correct(answer, numbers, target) else 0.0
