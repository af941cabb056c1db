"""scripts/sweep.py: its settings build valid configs, and its table compares a run with the reference and
the tilted target on the same problems."""

import json
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
)

import sweep  # noqa: E402


def test_every_setting_builds_a_checked_config():
  from trafl_jax import config_lib

  for name in sweep.SETTINGS:
    config = sweep.setting_config(name, seed=1, stage="screen", samples=4, limit=8)
    config_lib.check_config(config)
    assert config.seed == 1 and config.eval.splits == ("train",)
    for key, value in {**sweep.SCREEN_BASE, **sweep.SETTINGS[name]}.items():
      if key == "variant":
        continue
      section, field = key.split(".")
      assert config[section][field] == value, (name, key)
  d1 = sweep.setting_config("diffu_grpo_d1", seed=0, stage="seeds", samples=4, limit=8)
  assert (
    d1.rl.num_inner_updates == 8 and d1.rl.temperature == 0.9 and d1.rl.objective == "diffu_grpo"
  )
  assert sweep.setting_config("diffu_grpo", 0, "seeds", 4, 8).rl.num_inner_updates == 1
  seeds = sweep.setting_config("base", seed=0, stage="seeds", samples=64, limit=8)
  assert seeds.eval.splits == ("test", "train") and seeds.eval.num_samples == 64
  assert seeds.eval.gen_lengths == (16,)
  varied = sweep.setting_config("base", 0, "seeds", 64, 8, variant="varied_len", lengths=(16, 32))
  assert varied.eval.gen_lengths == (16, 32) and varied.data.answer_lens == (16, 24, 32)
  with pytest.raises(ValueError, match="unknown setting"):
    sweep.setting_config("nope", 0, "screen", 4, 8)


def test_table_measures_the_gap_to_the_target_on_the_same_problems(tmp_path):
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  with open(run_dir / "metrics.jsonl", "w") as f:
    for step, tilt in ((1, 0.0), (2, 1.0)):
      f.write(json.dumps({"step": step, "rl/reward_mean": 0.5, "diag/tilt": tilt}) + "\n")

  def record(label, pid, c):
    return {"checkpoint": label, "task": "countdown@train", "id": pid, "n": 4, "c": c}

  records = [record("reference", "a", 1), record("reference", "b", 3), record("reference", "x", 4)]
  records += [record("run/s0", "a", 2), record("run/s0", "b", 4)]  # "x" not evaluated: left out
  text, rows = sweep.table(records, [("run/s0", str(run_dir), 2.0)])
  (row,) = rows
  assert row["problems"] == 2 and row["k"] == 4
  assert row["pass1"] == pytest.approx(0.75) and row["reference_pass1"] == pytest.approx(0.5)
  e = math.exp(2.0)
  target = [p * e / (p * e + 1 - p) for p in (0.25, 0.75)]
  assert row["target_pass1"] == pytest.approx(sum(target) / 2)
  assert row["gap_closed"] == pytest.approx(0.25 / (row["target_pass1"] - 0.5))
  assert row["diag/tilt"] == pytest.approx(0.5) and "diag/mask_noise" not in row
  assert "| run/s0 | countdown@train | 2 |" in text


def test_the_seeds_report_groups_seeds_and_records_each_setting(tmp_path):
  from trafl_jax import evaluate

  eval_dir = tmp_path / "seeds_eval"
  eval_dir.mkdir()
  lines = []
  for label, hits in (("reference", (1, 2, 0)), ("base/s0", (2, 2, 1)), ("base/s1", (1, 3, 0))):
    for pid, c in zip(("a", "b", "x"), hits):
      rewards = [1.0] * c + [0.0] * (4 - c)
      record = evaluate.problem_record(
        rewards[0], rewards, ["1+2"] * 4, ["1+2"] * 4, np.zeros((4, 3), np.int32)
      )
      record.update(checkpoint=label, task="countdown", gen_length=16, id=pid)
      lines.append(json.dumps(record) + "\n")
  (eval_dir / "eval_records.jsonl").write_text("".join(lines))
  out = tmp_path / "results.json"
  runs = [("base/s0", str(tmp_path), 2.0), ("base/s1", str(tmp_path), 2.0)]
  sweep.write_report(str(eval_dir), ["base"], "/ref", runs, str(out))
  doc = json.loads(out.read_text())
  assert doc["settings"]["settings"]["base"] == sweep.SCREEN_BASE
  assert doc["settings"]["reference"] == "/ref"
  (row,) = doc["rows"]
  assert row["k"] == [1, 2, 3, 4] and row["problems"] == 3
  base = row["models"]["base"]  # the seeds grouped under their setting
  assert sorted(base["labels"]) == ["base/s0", "base/s1"]
  want = np.mean([(2 + 2 + 1) / 12, (1 + 3 + 0) / 12])  # pass@1: seed mean of the problem means
  assert base["pass@k"]["mean"][0] == pytest.approx(want, abs=1e-6)
  assert (eval_dir / "passk.png").exists() and (eval_dir / "eval.md").exists()
