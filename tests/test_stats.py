"""Evaluation statistics: bootstrap intervals over problems, paired differences, diversity per solved
problem, Countdown solutions found, difficulty buckets, and the reports built on them."""

import json
import math

import numpy as np
import pytest

from trafl_jax import eval_report, evaluate, report, stats
from trafl_jax.tasks import countdown


def _record(label, problem, c, n=8, task="countdown", gen_length=16, **extra):
  out = {"checkpoint": label, "task": task, "gen_length": gen_length, "id": problem, "n": n, "c": c}
  out |= {"greedy": float(c > n // 2), "distinct_correct_answers": min(c, 2), "commit_entropy": 0.1}
  out |= {"distinct_correct_completions": min(c, 2)}
  return out | extra


def _model(analysis, name, row=0):
  return next(m for m in analysis["rows"][row]["models"] if m["name"] == name)


def test_pass_at_k_table_matches_the_estimator():
  n_Q, c_Q = [8, 8, 8, 5, 5], [0, 3, 8, 1, 5]
  table_QxJ = stats.pass_at_k_QxJ(n_Q, c_Q, 5)
  for q, (n, c) in enumerate(zip(n_Q, c_Q)):
    for k in range(1, 6):
      assert table_QxJ[q, k - 1] == pytest.approx(evaluate.pass_at_k(n, c, k), abs=1e-12)
  with pytest.raises(ValueError):
    stats.pass_at_k_QxJ([4], [2], 5)  # k beyond n


def test_bootstrap_interval_holds_the_mean_and_shrinks_with_more_problems():
  rng = np.random.default_rng(0)
  widths = []
  for problems in (50, 800):
    values_Q = rng.uniform(size=problems) < 0.3
    figure = stats.interval(values_Q, stats.bootstrap_counts_RxQ(problems, seed=1))
    assert figure["lo"] < figure["mean"] < figure["hi"]
    assert figure["mean"] == pytest.approx(values_Q.mean(), abs=1e-6)
    widths.append(figure["hi"] - figure["lo"])
  # The width goes as 1/sqrt(problems): 16x the problems, about a quarter of the width.
  assert widths[1] < widths[0] / 2.5
  # Same seed, same draws: a report rebuilt is the same report.
  a = stats.bootstrap_counts_RxQ(30, 100, seed=[0, 7])
  assert np.array_equal(a, stats.bootstrap_counts_RxQ(30, 100, seed=[0, 7]))
  assert a.shape == (100, 30) and (a.sum(1) == 30).all()


def test_a_model_against_itself_differs_by_exactly_zero():
  counts = [0, 1, 3, 5, 8, 2, 7]
  records = [_record("reference", f"p{i}", c) for i, c in enumerate(counts)]
  records += [_record("copy/s0", f"p{i}", c) for i, c in enumerate(counts)]
  diff = _model(stats.analyze(records), "copy")["diff_vs_reference"]
  assert diff["mean"] == diff["lo"] == diff["hi"] == [0.0] * 8


def test_difference_sign_and_crossover():
  # The reference solves every problem a quarter of the time; the model solves half the problems
  # always and the other half never: better at k = 1 (0.5 vs 0.25), worse at k = 8 (0.5 vs 1).
  records = [_record("reference", f"p{i}", 2) for i in range(40)]
  records += [_record("locked", f"p{i}", 8 if i % 2 else 0) for i in range(40)]
  # One that gains on every problem: the difference is positive and its interval too.
  records += [_record("better", f"p{i}", 4) for i in range(40)]
  analysis = stats.analyze(records)
  locked = _model(analysis, "locked")["diff_vs_reference"]
  assert locked["mean"][0] == pytest.approx(0.25) and locked["lo"][0] > 0
  assert locked["mean"][-1] == pytest.approx(-0.5) and locked["hi"][-1] < 0
  # The reference's pass@2 is 1 - C(6,2)/C(8,2) = 0.46, its pass@3 1 - C(6,3)/C(8,3) = 0.64 > 0.5.
  assert locked["mean"][1] > 0 > locked["mean"][2]
  assert _model(analysis, "locked")["crossover_k"] == 3
  better = _model(analysis, "better")["diff_vs_reference"]
  assert all(lo > 0 for lo in better["lo"][:6]) and better["mean"][6:] == [0.0, 0.0]  # both 1 there
  assert _model(analysis, "better")["crossover_k"] is None
  assert stats.crossover_k([0.0, 0.1, 0.05, -0.01]) == 4 and stats.crossover_k([0.0, 0.0]) is None


def test_seeds_form_one_group_averaged_per_problem():
  assert stats.group_of("trafl/s12") == "trafl" and stats.group_of("reference") == "reference"
  assert stats.group_of("target (beta=2)") == "target (beta=2)" and stats.group_of("a/sx") == "a/sx"
  records = [_record("reference", f"p{i}", 4) for i in range(6)]
  records += [_record("trafl/s0", f"p{i}", 8) for i in range(6)]
  records += [_record("trafl/s1", f"p{i}", 0) for i in range(6)]
  analysis = stats.analyze(records)
  assert [m["name"] for m in analysis["rows"][0]["models"]] == ["reference", "trafl"]
  trafl = _model(analysis, "trafl")
  assert trafl["seeds"] == 2 and trafl["labels"] == ["trafl/s0", "trafl/s1"]
  assert trafl["pass@k"]["mean"][0] == pytest.approx(0.5)
  assert trafl["per_seed"]["trafl/s0"][0] == 1.0 and trafl["per_seed"]["trafl/s1"][0] == 0.0
  # Per problem the seeds average to exactly the reference's 0.5 at k = 1: no difference there.
  assert trafl["diff_vs_reference"]["hi"][0] == 0.0


def test_a_problem_missing_from_one_checkpoint_leaves_the_row():
  records = [_record("reference", f"p{i}", 1) for i in range(5)]
  records += [_record("trafl", f"p{i}", 1) for i in range(4)]
  [row] = stats.analyze(records)["rows"]
  assert row["problems"] == 4


def test_buckets_by_the_reference_success_rate():
  assert [stats.bucket_of(p) for p in (0.0, 0.01, 0.25, 0.26, 0.74, 0.75, 1.0)] == [
    "0",
    "(0, 0.25]",
    "(0, 0.25]",
    "(0.25, 0.75)",
    "(0.25, 0.75)",
    "[0.75, 1]",
    "[0.75, 1]",
  ]
  # Reference counts out of 8: two never solved, one at 1/8, three at 4/8, one at 8/8.
  counts = [0, 0, 1, 4, 4, 4, 8]
  records = [_record("reference", f"p{i}", c) for i, c in enumerate(counts)]
  records += [_record("trafl", f"p{i}", 8 if i < 2 else 0) for i in range(len(counts))]
  buckets = _model(stats.analyze(records), "trafl")["buckets"]
  assert {b: f["problems"] for b, f in buckets.items()} == {
    "0": 2,
    "(0, 0.25]": 1,
    "(0.25, 0.75)": 3,
    "[0.75, 1]": 1,
  }
  assert buckets["0"]["pass@1"] == 1.0 and buckets["(0.25, 0.75)"]["pass@8"] == 0.0


def test_distinct_answers_per_solved_problem_leave_out_unsolved_ones():
  records = [_record("reference", "p0", 0, distinct_correct_answers=0)]
  records += [_record("reference", "p1", 5, distinct_correct_answers=3)]
  records += [_record("reference", "p2", 2, distinct_correct_answers=1)]
  model = _model(stats.analyze(records), "reference")
  assert model["distinct_per_solved"]["mean"] == pytest.approx(2.0)  # (3 + 1) / 2, not / 3
  assert model["coverage"]["mean"] == pytest.approx(2 / 3)
  assert model["distinct_per_solved"]["lo"] >= 1.0 and model["distinct_per_solved"]["hi"] <= 3.0
  none = [_record("reference", "p0", 0, distinct_correct_answers=0)]
  assert _model(stats.analyze(none), "reference")["distinct_per_solved"]["mean"] is None


def test_solutions_found_on_a_countdown_problem():
  solutions = countdown.solutions([1, 2, 3], 6)
  assert {"1+2+3", "3*2*1", "1*2*3"} <= set(solutions)
  answers = [
    "1+2+3",
    "3*2*1",
    "(1+2)+3",
  ]  # the parenthesized one is correct but not a flat solution
  assert all(countdown.is_correct(a, [1, 2, 3], 6) for a in answers)
  record = _record("reference", "countdown/1,2,3->6", 3, correct_answers=sorted(answers))
  assert stats.solutions_found(record) == pytest.approx(2 / len(solutions))
  model = _model(stats.analyze([record]), "reference")
  assert model["solutions_found"]["mean"] == pytest.approx(2 / len(solutions))
  # Old records (no correct_answers) and other tasks: not computable, left out of the analysis.
  old = _record("reference", "countdown/1,2,3->6", 3)
  assert math.isnan(stats.solutions_found(old))
  assert "solutions_found" not in _model(stats.analyze([old]), "reference")
  assert math.isnan(stats.solutions_found(dict(record, id="gsm8k/12")))


def test_problem_records_carry_their_correct_answers():
  record = evaluate.problem_record(
    1.0, [1, 0, 1, 1], ["3*7+12", None, "12+3*7", "3*7+12"], ["a", "b", "c", "a"], np.zeros((4, 3))
  )
  assert record["correct_answers"] == ["12+3*7", "3*7+12"]
  assert record["distinct_correct_answers"] == 2


def _synthetic(beta=None):
  """A reference, two objectives with two seeds each, two tasks rows: records and summary."""
  rng = np.random.default_rng(0)
  labels = ["reference", "trafl/s0", "trafl/s1", "diffu_grpo/s0", "diffu_grpo/s1"]
  done = {}
  for task in ("countdown", "countdown@train"):
    for i in range(30):
      for label in labels:
        c = int(rng.integers(0, 9))
        answers = [f"{i + 1}*1*1"]  # one of the problem's solutions
        record = _record(
          label, f"countdown/1,1,{i + 1}->{i + 1}", c, task=task, correct_answers=answers
        )
        done[(label, task, 16, record["id"])] = record
  return done, evaluate._summaries(done, labels, beta)


def test_reports_with_statistics(tmp_path):
  done, summary = _synthetic(beta=2.0)
  config = {"num_samples": 8}
  analysis = eval_report.write_reports(
    summary, str(tmp_path), config, list(done.values()), 2.0, {"rl": {"beta": 2.0}}, commit="abc"
  )
  names = [m["name"] for m in analysis["rows"][0]["models"]]
  assert names == ["reference", "target (beta=2)", "trafl", "diffu_grpo"]
  png = (tmp_path / "passk.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
  md = (tmp_path / "eval.md").read_text()
  assert "| trafl/s1 |" in md  # the per-checkpoint tables stay
  assert "Paired difference against the reference, countdown, gen_length 16" in md
  assert "| [0.75, 1] |" in md and "distinct answers / solved" in md
  doc = json.loads((tmp_path / eval_report.RESULTS_FILE).read_text())
  assert doc["commit"] == "abc" and doc["settings"] == {
    "eval": config,
    "run": {"rl": {"beta": 2.0}},
  }
  assert doc["method"]["resamples"] == stats.RESAMPLES and doc["method"]["level"] == stats.LEVEL
  assert [(r["task"], r["split"]) for r in doc["rows"]] == [
    ("countdown", "test"),
    ("countdown@train", "train"),
  ]
  row = doc["rows"][0]
  assert row["k"] == list(range(1, 9))
  trafl = row["models"]["trafl"]
  for key in ("pass@k", "diff_vs_reference"):
    assert all(len(trafl[key][f]) == 8 for f in ("mean", "lo", "hi"))
  for key in ("greedy", "distinct_per_solved", "coverage", "solutions_found"):
    assert trafl[key]["lo"] <= trafl[key]["mean"] <= trafl[key]["hi"]
  assert set(trafl["per_seed"]) == {"trafl/s0", "trafl/s1"}
  assert json.loads((tmp_path / "eval.json").read_text())["commit"] == "abc"


def test_rebuild_from_the_records_alone(tmp_path):
  done, _ = _synthetic()
  with open(tmp_path / evaluate.RECORDS_FILE, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in done.values())
  (tmp_path / "config.json").write_text(json.dumps({"rl": {"beta": 1.5}}))
  analysis = report.rebuild(str(tmp_path))
  assert [m["name"] for m in analysis["rows"][0]["models"]][:2] == [
    "reference",
    "target (beta=1.5)",
  ]
  for name in ("eval.json", "eval.md", "passk.png", eval_report.RESULTS_FILE):
    assert (tmp_path / name).exists()
  first = (tmp_path / eval_report.RESULTS_FILE).read_text()
  report.rebuild(str(tmp_path))
  assert (tmp_path / eval_report.RESULTS_FILE).read_text() == first  # deterministic, commit kept
  with pytest.raises(FileNotFoundError):
    report.rebuild(str(tmp_path / "missing"))
