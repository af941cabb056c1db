"""Evaluation: the pass@k estimator, diversity/locking metrics, reports, and an interrupted run resuming."""

import dataclasses
import itertools
import json
import math
import os

import jax
import numpy as np
import pytest

from configs import math as math_config
from trafl_jax import config_lib, eval_report, evaluate, pipeline, sharding


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_equals_brute_force(n):
  for c in range(n + 1):
    samples = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
      subsets = list(itertools.combinations(range(n), k))
      want = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
      assert evaluate.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
  # C(1024, 512) overflows floats; the product form does not.
  value = evaluate.pass_at_k(1024, 3, 512)
  assert value == pytest.approx(1 - (512 * 511 * 510) / (1024 * 1023 * 1022), rel=1e-9)
  with pytest.raises(ValueError):
    evaluate.pass_at_k(4, 5, 2)


def test_ks_and_commit_entropy():
  assert evaluate.ks_for(16) == [1, 2, 4, 8, 16]
  assert evaluate.ks_for(12) == [1, 2, 4, 8, 12]
  assert evaluate.ks_for(1) == [1]
  locked = np.tile(np.arange(6), (8, 1))  # every sample commits position j at step j
  assert evaluate.commit_entropy(locked) == 0.0
  spread = np.stack([np.random.default_rng(i).permutation(6) for i in range(8)])
  assert evaluate.commit_entropy(spread) > 0.5
  half = np.array([[0, 1], [1, 0]] * 4)  # each position: two steps, equally often
  assert evaluate.commit_entropy(half) == pytest.approx(np.log(2))


def test_problem_record_and_summary():
  record = evaluate.problem_record(
    1.0,
    [1, 0, 1, 1],
    ["3*7+12", None, "12+3*7", "3*7+12"],
    ["a", "b", "c", "a"],
    np.zeros((4, 3), int),
  )
  assert record["c"] == 3 and record["n"] == 4
  assert record["distinct_correct_answers"] == 2
  assert record["distinct_correct_completions"] == 2
  other = dict(record, greedy=0.0, c=0, distinct_correct_answers=0)
  summary = evaluate.summarize([record, other])
  assert summary["greedy"] == 0.5
  assert summary["pass@1"] == pytest.approx((0.75 + 0.0) / 2)
  assert summary["pass@4"] == pytest.approx(0.5)
  assert summary["all_wrong"] == 0.5 and summary["distinct_correct_answers"] == 1.0


def test_reports(tmp_path):
  rows = [
    {
      "checkpoint": name,
      "task": "countdown",
      "gen_length": L,
      "problems": 10,
      "greedy": g,
      "pass@1": g,
      "pass@2": g + 0.1,
      "pass@4": g + 0.2,
      "distinct_correct_answers": 1.0,
      "distinct_correct_completions": 1.5,
      "commit_entropy": 0.3,
      "all_wrong": 0.4,
    }
    for name, g in (("reference", 0.2), ("trafl", 0.3))
    for L in (16, 32)
  ]
  eval_report.write_reports({"results": rows}, str(tmp_path), {"num_samples": 4})
  md = (tmp_path / "eval.md").read_text()
  assert "## countdown, gen_length 16 (10 problems)" in md
  assert "| trafl | 0.300 | 0.300 | 0.400 | 0.500 |" in md
  assert json.loads((tmp_path / "eval.json").read_text())["results"][0]["checkpoint"] == "reference"
  png = (tmp_path / "passk.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_sampler_settings_follow_the_grid():
  cfg = config_lib.eval_config(math_config.get_config("gsm8k"))
  assert [evaluate.sampler_settings(cfg, L)["steps"] for L in (128, 256, 512)] == [64, 128, 256]
  assert cfg.block_length == 32 and cfg.remasking == ("low_confidence",)


def test_each_remasking_is_a_row_and_the_main_job_adds_the_rollouts():
  config = math_config.get_config("tiny")
  assert config_lib.eval_config(config).remasking == ("low_confidence",)
  config.rl.remasking = "random"  # a policy trained on random-remasking rollouts
  cfg = pipeline.evaluation_config(config)
  assert cfg.remasking == ("low_confidence", "random")
  assert [(label, r) for label, _, r in cfg.rows()] == [
    ("countdown", "low_confidence"),
    ("countdown[random]", "random"),
  ]
  assert evaluate.sampler_settings(cfg, 16)["remasking"] == "low_confidence"
  assert evaluate.sampler_settings(cfg, 16, "random")["remasking"] == "random"
  config.rl.remasking = "low_confidence"
  assert pipeline.evaluation_config(config).remasking == ("low_confidence",)


def test_end_to_end_and_resume_without_recompute(tmp_path, monkeypatch):
  run_dir = str(tmp_path / "run")
  config = math_config.get_config("tiny")
  with config.unlocked():
    config.train.progress = False
  pipeline.reference_stage(config, run_dir)
  cfg = config_lib.eval_config(config)
  workdir = str(tmp_path / "eval")
  first = evaluate.run(cfg, [run_dir], workdir, labels=["ref"], show_progress=False)
  [row] = first["results"]
  assert row["problems"] == 6 and row["task"] == "countdown" and row["gen_length"] == 16
  assert 0.0 <= row["pass@1"] <= row["pass@2"] <= row["pass@4"] <= 1.0
  for name in ("eval.json", "eval.md", "passk.png", "results.json", evaluate.RECORDS_FILE):
    assert os.path.exists(os.path.join(workdir, name))
  with open(os.path.join(workdir, "results.json")) as f:
    [model] = json.load(f)["rows"][0]["models"].values()
  assert model["pass@k"]["mean"][0] == pytest.approx(row["pass@1"], abs=1e-6)

  # Drop the last batch's records (as if killed mid-run): only that batch is recomputed.
  records_path = os.path.join(workdir, evaluate.RECORDS_FILE)
  with open(records_path) as f:
    lines = f.read().splitlines()
  with open(records_path, "w") as f:
    f.write("\n".join(lines[:3]) + "\n" + lines[3][:20])
  calls = []
  original = evaluate._evaluate_batch
  monkeypatch.setattr(
    evaluate,
    "_evaluate_batch",
    lambda g, b, *a, **k: calls.append(len(b)) or original(g, b, *a, **k),
  )
  second = evaluate.run(cfg, [run_dir], workdir, labels=["ref"], show_progress=False)
  assert calls == [3]
  assert second["results"][0]["pass@1"] == pytest.approx(row["pass@1"])  # same seeds, same samples

  # Checkpoints load on the run's mesh: an FSDP config shards the parameters instead of replicating them.
  fsdp = sharding.Layout(mesh=(("data", 1), ("fsdp", -1), ("tensor", 1)))
  loaded = []
  original_checkpoint = evaluate.evaluate_checkpoint
  monkeypatch.setattr(
    evaluate,
    "evaluate_checkpoint",
    lambda g, *a, **k: loaded.append(g) or original_checkpoint(g, *a, **k),
  )
  evaluate.run(cfg, [run_dir], workdir, labels=["ref"], show_progress=False, layout=fsdp)
  assert loaded[0].mesh.shape["fsdp"] == 8
  specs = [leaf.sharding.spec for leaf in jax.tree.leaves(loaded[0].params)]
  assert any("fsdp" in spec for spec in specs)
  assert config_lib.layout(math_config.get_config("gsm8k")).mesh == (
    ("data", 1),
    ("fsdp", -1),
    ("tensor", 1),
  )


def test_rows_per_split_and_no_repeated_problem(tmp_path):
  config = math_config.get_config(
    ""
  )  # the main job's: the test and a probe of post-training prompts
  cfg = dataclasses.replace(config_lib.eval_config(config), limit=40)
  (test_label, test), (probe_label, probe) = cfg.problem_sets()
  assert (test_label, probe_label) == ("countdown", "countdown@train")
  assert len({p.id for p in test}) == len(test) == 40 and len({p.id for p in probe}) == 40
  prompts = {p.id for p in config_lib.posttrain_config(config).train_problems.load()}
  assert {p.id for p in probe} <= prompts  # the probe is made of post-training prompts
  assert not {p.id for p in test} & prompts  # the test shares none
  # A file with a repeated question: it is evaluated once.
  path = tmp_path / "gsm8k.jsonl"
  rows = [("What is 2 + 3?", "#### 5"), ("What is 4 * 4?", "#### 16"), ("What is 2 + 3?", "#### 5")]
  path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
  gsm = dataclasses.replace(cfg, tasks=(f"gsm8k={path}",), splits=("test",), limit=None)
  [(label, problems)] = gsm.problem_sets()
  assert label == "gsm8k:gsm8k" and [p.prompt for p in problems] == [rows[0][0], rows[1][0]]


def test_the_target_row_is_the_reference_tilted_by_beta(tmp_path):
  beta = math.log(3.0)  # e^beta = 3: p = 1/2 -> p* = 3/4
  records = {}
  for i, c in enumerate((2, 0, 4)):
    rewards = [1.0] * c + [0.0] * (4 - c)
    steps = np.zeros((4, 3), np.int32)
    for label in ("reference", "trafl"):
      record = evaluate.problem_record(0.0, rewards, ["7"] * 4, ["a"] * 4, steps)
      records[(label, "countdown", 16, f"p{i}")] = record
  target = evaluate.target_summary([r for k, r in records.items() if k[0] == "reference"], beta)
  assert target["pass@1"] == pytest.approx((0.75 + 0 + 1) / 3)
  assert target["pass@2"] == pytest.approx((1 - 0.25**2 + 0 + 1) / 3)
  assert target["pass@4"] == pytest.approx((1 - 0.25**4 + 0 + 1) / 3)
  summary = evaluate._summaries(records, ["reference", "trafl"], target_beta=beta)
  names = [r["checkpoint"] for r in summary["results"]]
  assert names == ["reference", "target (beta=1.09861)", "trafl"]
  reference, tilted = summary["results"][0], summary["results"][1]
  assert all(tilted[f"pass@{k}"] >= reference[f"pass@{k}"] for k in (1, 2))
  table = eval_report.markdown(summary)
  assert "| target (beta=1.09861) | - | 0.583 |" in table
  eval_report.plot(summary, str(tmp_path / "passk.png"))
  assert (tmp_path / "passk.png").stat().st_size > 5000
  assert "target" not in {
    r["checkpoint"] for r in evaluate._summaries(records, ["trafl"], beta)["results"]
  }


def test_rows_sampled_in_a_fast_mode_are_tagged_with_it():
  config = math_config.get_config("tiny")
  config.eval.sampler.cache = "dual"
  config.eval.sampler.threshold = 0.9
  config.eval.remasking = ("low_confidence", "random")
  with pytest.raises(ValueError, match="needs remasking 'low_confidence'"):
    config_lib.eval_config(config)  # a threshold on random scores means nothing
  config.eval.remasking = ("low_confidence",)
  cfg = config_lib.eval_config(config)
  assert [label for label, _, _ in cfg.rows()] == ["countdown[dual+t0.9]"]
  settings = evaluate.sampler_settings(cfg, 16)
  assert settings["cache"] == "dual" and settings["threshold"] == 0.9
  with config.unlocked():  # a locked config refuses it already; a stored one is checked too
    config.eval.sampler.cahce = "prefix"
  with pytest.raises(ValueError, match="eval.sampler has keys nothing reads: cahce"):
    config_lib.eval_config(config)
