"""The post-training loop: every objective end to end on the tiny preset, and exact resume."""

import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import common
from configs import math as math_config
from trafl_jax import config_lib, metrics, objectives, pipeline, posttrain

from .conftest import FAMILIES

# The loop's mechanics need rewards that vary within a group (conftest.parity_rewards).
pytestmark = pytest.mark.usefixtures("parity_rewards")


def _config(family="llada", **rl):
  config = math_config.get_config("tiny")
  if family == "dream":  # the same job on a Dream-shaped model (shifted predictions, q/k/v biases)
    common.apply_preset(config, "dream_tiny")
  with config.unlocked():
    config.train.progress = False
    for key, value in rl.items():
      config.rl[key] = value
  return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("posttrain") / "reference")
  pipeline.reference_stage(_config(), path)
  return path


@pytest.fixture(scope="module")
def references(reference, tmp_path_factory):
  """A tiny reference of each model family."""
  path = str(tmp_path_factory.mktemp("posttrain_dream") / "reference")
  pipeline.reference_stage(_config("dream"), path)
  return {"llada": reference, "dream": path}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("objective", objectives.OBJECTIVES)
def test_each_objective_runs_end_to_end(references, tmp_path, objective, family):
  workdir = str(tmp_path / objective)
  extra = {"num_inner_updates": 2} if objective in ("diffu_grpo", "elbo_grpo") else {}
  config = _config(family, objective=objective, **extra)
  last = pipeline.posttrain_stage(config, workdir, references[family])
  records = metrics.read_metrics(workdir)
  assert [r["step"] for r in records] == [1, 2, 3]
  for key in (
    "rl/loss",
    "rl/reward_mean",
    "rl/kl_estimate",
    "rl/grad_norm",
    "time/sample_s",
    "time/score_s",
    "time/update_s",
    "perf/tokens_per_s",
  ):
    assert np.isfinite(last[key]), key
  assert "eval/greedy" in records[-1]
  for key in ("diag/success_rate", "diag/p_ref_iw", "diag/iw_ess", "diag/tilt", "diag/kl_target"):
    assert np.isfinite(last[key]), key
  assert 1 <= last["diag/iw_ess"] <= 4  # group_size 4
  assert last["diag/success_rate"] == pytest.approx(last["rl/reward_mean"])  # 0/1 rewards
  # The second mask draw every rl.diag_noise_every = 2 steps (tiny), from the second step on, where the
  # policy is no longer the reference (l_theta - l_ref is 0 under any mask on the first).
  assert "diag/mask_noise" not in records[0] and "diag/mask_noise" not in records[2]
  # Every objective takes a step on rewards that vary (the second mask draw then sees a moved policy).
  assert records[0]["rl/grad_norm"] > 0
  assert records[1]["diag/mask_noise"] > 0
  if objective == "trafl":
    assert last["trafl/log_z_min"] <= last["trafl/log_z_mean"] <= last["trafl/log_z_max"]
    assert np.isfinite(last["diag/head_rmse"]) and "diag/centred_sq_mixed" in last
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps[-1] == 3
  # The log Z head is checkpointed with the state, not with the exported parameters.
  train_state = os.path.join(workdir, "checkpoints", "3", "train_state")
  tree = ocp.StandardCheckpointer().metadata(train_state).item_metadata.tree
  assert "log_z" in tree and "out" in tree["log_z"]
  params_tree = (
    ocp.StandardCheckpointer()
    .metadata(os.path.join(workdir, "checkpoints", "3", "params"))
    .item_metadata.tree
  )
  assert "log_z" not in params_tree and "wte" in params_tree


def test_resume_is_exact(reference, tmp_path):
  config = _config(num_steps=4, ckpt_every=1, eval_every=0, sample_every=0)  # 0: first step only
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  pipeline.posttrain_stage(config, straight, reference)
  pipeline.posttrain_stage(config, resumed, reference, max_steps=2)
  assert metrics.read_metrics(resumed)[-1]["step"] == 2
  pipeline.posttrain_stage(config, resumed, reference)
  a, b = metrics.read_metrics(straight), metrics.read_metrics(resumed)
  assert [r["step"] for r in b] == [1, 2, 3, 4]
  for key in ("rl/loss", "rl/reward_mean", "rl/kl_estimate", "trafl/log_z_mean"):
    assert [r[key] for r in a] == [r[key] for r in b], key
  pa = ocp.StandardCheckpointer().restore(os.path.join(straight, "checkpoints", "4", "params"))
  pb = ocp.StandardCheckpointer().restore(os.path.join(resumed, "checkpoints", "4", "params"))
  np.testing.assert_array_equal(pa["wte"], pb["wte"])
  np.testing.assert_array_equal(pa["ff_out"]["kernel"], pb["ff_out"]["kernel"])


def test_prompts_follow_the_reference_data_settings():
  config = _config()
  with config.unlocked():
    config.data.countdown_max_number = 6
  for split in ("train", "test"):
    pcfg = config_lib.posttrain_config(config)
    problems = (pcfg.train_problems if split == "train" else pcfg.test_problems).load()
    assert len(problems) == (64 if split == "train" else 8)
    assert max(max(p.reference["numbers"]) for p in problems) <= 6


def test_prompt_order_is_a_function_of_the_step():
  first = posttrain.prompt_indices(10, 0, 4, seed=1)
  again = posttrain.prompt_indices(10, 0, 4, seed=1)
  np.testing.assert_array_equal(first, again)
  epoch = np.concatenate([posttrain.prompt_indices(10, s, 5, seed=1) for s in range(2)])
  assert sorted(epoch.tolist()) == list(range(10))  # one epoch visits every prompt once
  wrap = posttrain.prompt_indices(10, 2, 4, seed=1)  # straddles the epoch boundary
  assert len(wrap) == 4


def test_bad_rollout_shape_is_named(reference, tmp_path):
  with pytest.raises(ValueError, match="do not divide"):
    pipeline.posttrain_stage(
      _config(prompts_per_step=3, group_size=3), str(tmp_path / "bad"), reference
    )


def test_reference_rollouts_do_not_follow_the_policy(reference, tmp_path):
  """With every group member sampled from the frozen reference, what is sampled does not depend on how
  far the policy moved; on-policy it does."""

  def lengths(tag, **rl):
    config = _config(eval_every=0, log_z_bounded=True, **rl)
    pipeline.posttrain_stage(config, str(tmp_path / tag), reference)
    return [r["rl/completion_length"] for r in metrics.read_metrics(str(tmp_path / tag))]

  off_slow = lengths("off_slow", reference_rollouts=4, lr=1e-5)
  off_fast = lengths("off_fast", reference_rollouts=4, lr=3e-2)
  on_slow, on_fast = lengths("on_slow", lr=1e-5), lengths("on_fast", lr=3e-2)
  assert off_slow == off_fast
  assert on_slow != on_fast
  assert on_slow[0] == on_fast[0]  # the first step samples the reference either way


@pytest.mark.parametrize(
  "rl,match",
  [
    ({"reference_rollouts": 5}, "between 0 and rl.group_size"),
    ({"reference_rollouts": 1}, "do not divide"),  # 4 prompts x 1 row over 8 devices
    ({"reference_rollouts": 2, "objective": "diffu_grpo"}, "TraFL's"),
  ],
)
def test_bad_reference_rollouts_are_named(reference, tmp_path, rl, match):
  with pytest.raises(ValueError, match=match):
    pipeline.posttrain_stage(_config(**rl), str(tmp_path / "bad"), reference)


def test_fast_rollouts_are_recorded_and_refused_by_the_trajectory_estimator(reference, tmp_path):
  config = _config()
  config.rl.rollout.cache = "dual"
  config.rl.rollout.stop_at_eos = True
  assert config_lib.sampler_config(config).mode == "dual+eos"
  workdir = str(tmp_path / "fast")
  last = pipeline.posttrain_stage(config, workdir, reference)
  # At most one evaluation per step of the exact schedule (fewer once rows end).
  assert 0 < last["rollout/nfe_per_token"] <= config.rl.sample_steps / config.rl.gen_length
  config = _config(estimator="trajectory", remasking="random")
  config.rl.rollout.cache = "prefix"
  with pytest.raises(ValueError, match="replays the exact sampler's steps"):
    config_lib.objective_config(config)
  with config.unlocked():
    config.rl.rollout.kache = "prefix"
  with pytest.raises(ValueError, match="rl.rollout has keys nothing reads: kache"):
    config_lib.sampler_config(config)


def test_problems_seed_fixes_the_problems_across_run_seeds():
  def prompts(seed, problems_seed):
    config = _config(train_limit=16, problems_seed=problems_seed)
    config.seed = seed
    return sorted(p.prompt for p in config_lib.posttrain_config(config).train_problems.load())

  assert prompts(0, -1) != prompts(1, -1)  # by default the run's seed draws them
  assert prompts(1, 0) == prompts(2, 0) == prompts(0, -1)
