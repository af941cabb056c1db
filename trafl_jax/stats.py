"""Statistics over per-problem evaluation records: bootstrap intervals, paired differences, diversity.

Every interval here resamples *problems* (a percentile bootstrap, 2,000 resamples, 95% by default): the
evaluation set is a sample of the task's problems, and that sampling is what a reader's "is it better?"
is about. The n samples per problem enter only through each problem's unbiased pass@k. A model group's
seeds (`trafl/s0`, `trafl/s1`, ...) are averaged per problem first, so a problem stays one unit; the seeds'
own means are kept beside (`per_seed`) for the training spread the bootstrap does not see. Every model
of a row is resampled with the same draws, and the draws are fixed by the seed and the row's name, so a
report rebuilt from the same records is the same report.

What `analyze` gives per (task row, gen_length) and model group:
- `pass@k` for k = 1..n: mean over problems with its interval;
- `diff_vs_reference`: the paired per-problem difference of pass@k against the reference (same problems),
  mean and interval; `crossover_k`, the first k where its mean changes sign from its sign at k = 1;
- `coverage` (fraction of problems solved by some sample, i.e. pass@n) apart from `distinct_per_solved`
  (distinct correct answers per solved problem): a model can solve fewer problems in more ways;
- `solutions_found` (Countdown, records with `correct_answers`): per solved problem, the fraction of
  `countdown.solutions()` among its distinct correct answers (answers outside that list, e.g. with
  parentheses, count for nothing: the list is the flat expressions the task generates answers from);
- `buckets`: pass@1 and pass@n by the reference's success rate p = c/n on the problem (`BUCKETS`). The
  reference's own numbers there are selected on the same samples that bucket them (its "0" bucket is 0 by
  construction and every other model regresses toward the mean): compare models within a bucket, and read
  the reference's row as a floor/ceiling, not an estimate.

Pure numpy (and Countdown's solver): no JAX, so reports rebuild anywhere.

Dimension legend (beyond the project's):  Q problems of a row   J values of k (1..n)   E seeds (runs) of a
model group   R bootstrap resamples   C success counts 0..n
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from trafl_jax.tasks import countdown

REFERENCE = "reference"
RESAMPLES = 2000
LEVEL = 0.95
# By the reference's success rate p = c/n: never solved, hard, middling, easy.
BUCKETS = ("0", "(0, 0.25]", "(0.25, 0.75)", "[0.75, 1]")
_SEED_RE = re.compile(r"^(.+)/s\d+$")
_DIGITS = 6  # rounding of reported figures: far below any interval's width


def group_of(label: str) -> str:
  """A checkpoint label's model group: `trafl/s2` -> `trafl`; a label without a seed is its own group."""
  match = _SEED_RE.match(label)
  return match.group(1) if match else label


def bucket_of(p: float) -> str:
  """The difficulty bucket (`BUCKETS`) of a reference success rate p in [0, 1]."""
  if p <= 0.0:
    return BUCKETS[0]
  if p <= 0.25:
    return BUCKETS[1]
  return BUCKETS[2] if p < 0.75 else BUCKETS[3]


# ----------------------------------------------------------------------------------------------
# Estimators


@functools.cache
def _pass_at_k_table(n: int, k_max: int) -> np.ndarray:
  out_CxJ = np.ones((n + 1, k_max))
  for c in range(n + 1):
    for k in range(1, min(k_max, n - c) + 1):  # n - c < k: every k-subset holds a correct sample
      out_CxJ[c, k - 1] = 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1))
  return out_CxJ


def pass_at_k_QxJ(n_Q: Sequence[int], c_Q: Sequence[int], k_max: int) -> np.ndarray:
  """Each problem's unbiased pass@k, `1 - C(n-c, k) / C(n, k)`, for k = 1..k_max (k_max <= every n)."""
  n_Q, c_Q = np.asarray(n_Q, int), np.asarray(c_Q, int)
  if k_max > n_Q.min(initial=k_max) or np.any(c_Q < 0) or np.any(c_Q > n_Q):
    raise ValueError(f"pass@k needs 0 <= c <= n and k <= n (k_max={k_max})")
  out_QxJ = np.empty((len(c_Q), k_max))
  for n in np.unique(n_Q):
    rows = n_Q == n
    out_QxJ[rows] = _pass_at_k_table(int(n), k_max)[c_Q[rows]]
  return out_QxJ


def tilted_pass_at_k_QxJ(p_Q: np.ndarray, beta: float, k_max: int) -> np.ndarray:
  """The tilted target's plug-in pass@k per problem: `p* = p e^b / (p e^b + 1 - p)`, `1 - (1 - p*)^k`."""
  tilted_Q = p_Q * math.exp(beta) / (p_Q * math.exp(beta) + 1.0 - p_Q)
  return 1.0 - (1.0 - tilted_Q[:, None]) ** np.arange(1, k_max + 1)[None, :]


@functools.cache
def _countdown_solutions(problem_id: str) -> frozenset[str] | None:
  """The flat solutions of a Countdown problem from its id (`countdown/5,6,9->2`), or None."""
  match = re.fullmatch(r"countdown/([\d,]+)->(\d+)", problem_id)
  if not match:
    return None
  numbers = [int(x) for x in match.group(1).split(",")]
  return frozenset(countdown.solutions(numbers, int(match.group(2))))


def solutions_found(record: Mapping) -> float:
  """The fraction of the problem's `countdown.solutions()` among the record's distinct correct answers
  (both in extract_answer's canonical form: no spaces around operators); NaN when not computable (not
  a Countdown problem, or an old record without `correct_answers`)."""
  found = _countdown_solutions(record["id"])
  if not found or "correct_answers" not in record:
    return math.nan
  return len(found & set(record["correct_answers"])) / len(found)


# ----------------------------------------------------------------------------------------------
# Bootstrap over problems


def bootstrap_counts_RxQ(
  num_problems: int, resamples: int = RESAMPLES, seed: int = 0
) -> np.ndarray:
  """How often each problem is drawn in each resample (a resample draws Q problems with replacement)."""
  rng = np.random.default_rng(seed)
  return rng.multinomial(num_problems, np.full(num_problems, 1.0 / num_problems), size=resamples)


def interval(values_QxJ: np.ndarray, counts_RxQ: np.ndarray, level: float = LEVEL) -> dict:
  """Mean over problems and its percentile-bootstrap interval: `{mean, lo, hi}`, lists over the columns
  of a Q x J array, numbers for a length-Q vector."""
  values = np.asarray(values_QxJ, np.float64)
  values_QxJ = values.reshape(values.shape[0], -1)
  means_RxJ = counts_RxQ @ values_QxJ / values_QxJ.shape[0]
  lo_J, hi_J = np.quantile(means_RxJ, [(1 - level) / 2, (1 + level) / 2], axis=0)
  figures = (values_QxJ.mean(0), lo_J, hi_J)
  if values.ndim == 1:
    figures = tuple(x[0] for x in figures)
  return dict(zip(("mean", "lo", "hi"), map(_round, figures)))


def ratio_interval(
  num_Q: np.ndarray, den_Q: np.ndarray, counts_RxQ: np.ndarray, level=LEVEL
) -> dict:
  """`sum num / sum den` over problems and its percentile-bootstrap interval (resamples whose
  denominator is 0 are left out); NaNs (None in JSON) when the denominator is 0."""
  total = float(np.sum(den_Q))
  if total == 0:
    return {"mean": None, "lo": None, "hi": None}
  with np.errstate(invalid="ignore", divide="ignore"):
    ratios_R = (counts_RxQ @ num_Q) / (counts_RxQ @ den_Q)
  lo, hi = np.nanquantile(ratios_R, [(1 - level) / 2, (1 + level) / 2])
  return {"mean": _round(np.sum(num_Q) / total), "lo": _round(lo), "hi": _round(hi)}


def _round(x):
  if np.ndim(x) == 0:
    return round(float(x), _DIGITS) + 0.0  # + 0.0: no "-0.0" in reports
  return [round(float(v), _DIGITS) + 0.0 for v in x]


# ----------------------------------------------------------------------------------------------
# Records -> per-problem arrays


@dataclasses.dataclass(frozen=True)
class Group:
  """One model group's records on one row's problems: seeds by problems."""

  name: str
  labels: tuple[str, ...]
  n_ExQ: np.ndarray
  c_ExQ: np.ndarray
  greedy_ExQ: np.ndarray
  distinct_ExQ: np.ndarray
  found_ExQ: np.ndarray  # solutions_found, NaN where not computable

  def pass_at_k_QxJ(self, k_max: int) -> np.ndarray:
    """Per-problem pass@k averaged over the seeds."""
    return np.mean([pass_at_k_QxJ(n, c, k_max) for n, c in zip(self.n_ExQ, self.c_ExQ)], axis=0)

  def per_seed(self, k_max: int) -> dict[str, list[float]]:
    return {
      label: _round(pass_at_k_QxJ(n, c, k_max).mean(0))
      for label, n, c in zip(self.labels, self.n_ExQ, self.c_ExQ)
    }


def rows(records: Sequence[Mapping]) -> dict[tuple[str, int], tuple[list[str], dict[str, Group]]]:
  """Per (task, gen_length): the problem ids every checkpoint of the row has, and the model groups
  (in order of first appearance) as arrays over those problems. A problem some checkpoint lacks (an
  interrupted evaluation) is left out of the whole row, so every comparison is paired."""
  by_row: dict[tuple, dict[str, dict[str, Mapping]]] = {}
  for r in records:
    by_row.setdefault((r["task"], r["gen_length"]), {}).setdefault(r["checkpoint"], {})[r["id"]] = r
  out = {}
  for key, by_label in by_row.items():
    ids = sorted(set.intersection(*(set(v) for v in by_label.values())))
    if not ids:
      continue
    labels_by_group: dict[str, list[str]] = {}
    for label in by_label:
      labels_by_group.setdefault(group_of(label), []).append(label)
    groups = {}
    for name, labels in labels_by_group.items():
      table = [[by_label[label][i] for i in ids] for label in labels]
      groups[name] = Group(
        name,
        tuple(labels),
        n_ExQ=_field(table, lambda r: r["n"]),
        c_ExQ=_field(table, lambda r: r["c"]),
        greedy_ExQ=_field(table, lambda r: r["greedy"]),
        distinct_ExQ=_field(table, lambda r: r["distinct_correct_answers"]),
        found_ExQ=_field(table, solutions_found),
      )
    out[key] = (ids, groups)
  return out


def _field(table: list[list[Mapping]], value) -> np.ndarray:
  """`value(record)` for each seed's record of each problem: an E x Q array."""
  return np.array([[value(r) for r in seed] for seed in table])


# ----------------------------------------------------------------------------------------------
# The analysis


def analyze(
  records: Sequence[Mapping],
  target_beta: float | None = None,
  reference: str = REFERENCE,
  resamples: int = RESAMPLES,
  level: float = LEVEL,
  seed: int = 0,
) -> dict:
  """Every row's models with their intervals (module docstring); JSON-ready. With `target_beta` and a
  `reference` group, the tilted target follows the reference as a model of its own (pass@k, difference
  and buckets only: it has no samples)."""
  out_rows = []
  for (task, gen_length), (ids, groups) in rows(records).items():
    k_max = int(min(g.n_ExQ.min() for g in groups.values()))
    row_seed = [seed, zlib.crc32(f"{task}/{gen_length}".encode())]
    counts_RxQ = bootstrap_counts_RxQ(len(ids), resamples, row_seed)
    passk = {name: g.pass_at_k_QxJ(k_max) for name, g in groups.items()}
    ref = groups.get(reference)
    p_ref_Q = (ref.c_ExQ / ref.n_ExQ).mean(0) if ref else None
    if ref and target_beta is not None:
      passk = _insert_after(
        passk,
        reference,
        f"target (beta={target_beta:g})",
        tilted_pass_at_k_QxJ(p_ref_Q, target_beta, k_max),
      )
    models = []
    for name, values_QxJ in passk.items():
      model = {"name": name, "labels": list(groups[name].labels) if name in groups else []}
      model["pass@k"] = interval(values_QxJ, counts_RxQ, level)
      if ref and name != reference:
        diff = interval(values_QxJ - passk[reference], counts_RxQ, level)
        model["diff_vs_reference"] = diff
      if ref and name != reference and name in groups:
        # Not for the target: its plug-in pass@k sits a hair under the unbiased one as k nears n.
        model["crossover_k"] = crossover_k(diff["mean"])
      if name in groups:
        model.update(_sample_figures(groups[name], counts_RxQ, level, k_max))
      if ref:
        model["buckets"] = _buckets(values_QxJ, p_ref_Q)
      models.append(model)
    out_rows.append(
      {"task": task, "gen_length": gen_length, "problems": len(ids), "k": list(range(1, k_max + 1))}
      | {"models": models}
    )
  method = {
    "interval": "percentile bootstrap over problems",
    "level": level,
    "resamples": resamples,
  }
  method["seed"] = seed
  method["buckets"] = "reference success rate c/n: " + ", ".join(BUCKETS)
  return {"method": method, "rows": out_rows}


def _insert_after(d: dict, after: str, key: str, value) -> dict:
  out = {}
  for k, v in d.items():
    out[k] = v
    if k == after:
      out[key] = value
  return out


def crossover_k(mean_diff_J: Sequence[float]) -> int | None:
  """The first k (1-based) where the mean difference has the opposite sign to its first nonzero one."""
  signs = np.sign(mean_diff_J)
  nonzero = signs[signs != 0]
  if not len(nonzero):
    return None
  flips = np.nonzero(signs == -nonzero[0])[0]
  return int(flips[0]) + 1 if len(flips) else None


def _sample_figures(group: Group, counts_RxQ: np.ndarray, level: float, k_max: int) -> dict:
  """What only sampled models have: seeds, greedy, coverage, distinct answers and solutions found
  per solved problem (pooled over seeds: per (seed, problem) the model solved)."""
  solved_ExQ = (group.c_ExQ > 0).astype(np.float64)
  out = {"seeds": len(group.labels), "per_seed": group.per_seed(k_max)}
  out["greedy"] = interval(group.greedy_ExQ.mean(0), counts_RxQ, level)
  out["coverage"] = interval(solved_ExQ.mean(0), counts_RxQ, level)
  num_Q = (group.distinct_ExQ * solved_ExQ).sum(0)
  out["distinct_per_solved"] = ratio_interval(num_Q, solved_ExQ.sum(0), counts_RxQ, level)
  found_ExQ = group.found_ExQ
  if not np.isnan(found_ExQ).any():
    num_Q = (found_ExQ * solved_ExQ).sum(0)
    out["solutions_found"] = ratio_interval(num_Q, solved_ExQ.sum(0), counts_RxQ, level)
  return out


def _buckets(values_QxJ: np.ndarray, p_ref_Q: np.ndarray) -> dict:
  """Per difficulty bucket: its problem count and the model's mean pass@1 and pass@n there."""
  names = np.array([bucket_of(p) for p in p_ref_Q])
  out = {}
  for name in BUCKETS:
    rows_Q = names == name
    if rows_Q.any():
      out[name] = {
        "problems": int(rows_Q.sum()),
        "pass@1": _round(values_QxJ[rows_Q, 0].mean()),
        f"pass@{values_QxJ.shape[1]}": _round(values_QxJ[rows_Q, -1].mean()),
      }
  return out
