"""The per-step diagnostics against hand computations."""

import jax.numpy as jnp
import numpy as np
import pytest

from trafl_jax import diagnostics, objectives

LN3 = float(np.log(3.0))
BETA = LN3  # e^beta - 1 = 2: round numbers for the target

# Four groups of four: mixed (p_ref 0.1), mixed (p_ref 0.5), all wrong, all correct.
REWARDS = np.array([[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], np.float32)
# l_ref - l_theta: the importance weights' logs (w = 1 or 3).
LOG_W = np.array([[0, LN3, LN3, LN3], [0, 0, 0, LN3], [-1, 1, -0.5, 0], [0, 0, 0, 0]], np.float32)
L_REF = np.full((4, 4), -10.0, np.float32)
L_THETA = L_REF - LOG_W
LENGTH = np.array([[3, 5, 7, 9], [2, 4, 6, 8], [1, 1, 1, 1], [10, 10, 10, 10]], np.float32)


def test_reference_success_and_its_ess():
  p_ref, ess = diagnostics.reference_success(REWARDS, L_THETA, L_REF)
  # Group 0: w = (1, 3, 3, 3) / 10; group 1: w = (1, 1, 1, 3) / 6.
  np.testing.assert_allclose(p_ref[:2], [0.1, 0.5], rtol=1e-6)
  np.testing.assert_allclose(p_ref[2:], [0.0, 1.0], atol=1e-7)
  w2 = np.exp(LOG_W[2]) / np.exp(LOG_W[2]).sum()
  np.testing.assert_allclose(ess, [100 / 28, 36 / 12, 1 / (w2**2).sum(), 4.0], rtol=1e-5)


def test_target_of_the_reference_success_rate():
  log_z, p_star, kl = diagnostics.target(jnp.array([0.0, 0.25, 1.0]), BETA)
  # Z* = 1 + 2 p; p* = 3 p / Z*; KL = p* ln 3 - log Z*.
  np.testing.assert_allclose(log_z, [0.0, np.log(1.5), LN3], rtol=1e-6)
  np.testing.assert_allclose(p_star, [0.0, 0.5, 1.0], rtol=1e-6)
  np.testing.assert_allclose(kl, [0.0, 0.5 * LN3 - np.log(1.5), 0.0], atol=1e-6)


def test_achieved_tilt_is_masked_outside_the_open_interval():
  tilt, valid = diagnostics.achieved_tilt(
    jnp.array([0.25, 0.5, 0.0, 1.0, 0.5]), jnp.array([0.1, 0.25, 0.0, 1.0, 0.0])
  )
  np.testing.assert_array_equal(valid, [True, True, False, False, False])
  np.testing.assert_allclose(tilt, [LN3, LN3, 0.0, 0.0, 0.0], rtol=1e-6, atol=1e-7)


def test_group_metrics_by_hand():
  m = diagnostics.group_metrics(REWARDS, L_THETA, L_REF, LENGTH, BETA)
  m = {k: float(v) for k, v in m.items()}
  assert m["diag/success_rate"] == pytest.approx((0.25 + 0.75 + 0 + 1) / 4)
  assert m["diag/p_ref_iw"] == pytest.approx((0.1 + 0.5 + 0 + 1) / 4)
  assert m["diag/log_z_star"] == pytest.approx((np.log(1.2) + np.log(2.0) + 0 + LN3) / 4)
  assert m["diag/p_target"] == pytest.approx((0.3 / 1.2 + 1.5 / 2.0 + 0 + 1) / 4, rel=1e-6)
  kl = (0.25 * LN3 - np.log(1.2)) + (0.75 * LN3 - np.log(2.0))
  assert m["diag/kl_target"] == pytest.approx(kl / 4, rel=1e-5)
  # Both mixed groups sit at the target's tilt, beta; p_ref 0.1 is hard, 0.5 medium, none easy.
  assert m["diag/tilt"] == pytest.approx(BETA, rel=1e-5)
  assert m["diag/tilt_groups"] == 2
  assert (m["diag/tilt_hard"], m["diag/tilt_hard_groups"]) == pytest.approx((BETA, 1), rel=1e-5)
  assert (m["diag/tilt_medium"], m["diag/tilt_medium_groups"]) == pytest.approx((BETA, 1), rel=1e-5)
  assert (m["diag/tilt_easy"], m["diag/tilt_easy_groups"]) == (0.0, 0.0)
  # Correct: 3; 2, 4, 6; 10 x 4. Wrong: 5, 7, 9; 8; 1 x 4.
  assert m["diag/length_correct"] == pytest.approx((3 + 2 + 4 + 6 + 40) / 8)
  assert m["diag/length_wrong"] == pytest.approx((5 + 7 + 9 + 8 + 4) / 8)
  assert m["diag/iw_ess_frac"] == pytest.approx(m["diag/iw_ess"] / 4)
  assert all(np.isfinite(v) for v in m.values())


def test_head_error_against_the_groups_balancing_log_z():
  balance = diagnostics.balance_log_z(REWARDS, L_THETA, L_REF, BETA)
  # beta r + (l_ref - l_theta) is ln 3 on every sample of groups 0, 1 and 3.
  want_2 = np.log(np.mean(np.exp(LOG_W[2])))
  np.testing.assert_allclose(balance, [LN3, LN3, want_2, LN3], rtol=1e-6)
  log_z = np.array([LN3 + 0.5, LN3 - 0.5, 0.0, LN3 + 1.0], np.float32)
  m = diagnostics.head_metrics(log_z, REWARDS, L_THETA, L_REF, BETA)
  err = np.array([0.5, -0.5, -want_2, 1.0])
  assert float(m["diag/head_bias"]) == pytest.approx(err.mean(), rel=1e-5)
  assert float(m["diag/head_rmse"]) == pytest.approx(np.sqrt((err**2).mean()), rel=1e-5)


def test_residual_split_by_kind_of_group():
  # Group 0 mixed, group 1 all wrong; no all-correct group.
  rewards = np.array([[1, 0, 0], [0, 0, 0]], np.float32)
  l_ref = np.zeros((2, 3), np.float32)
  l_theta = np.array([[1, 0, 2], [0.5, -0.5, 3]], np.float32)
  log_z = np.array([2.0, -1.0], np.float32)
  beta = 2.0
  # delta = log_z + l_theta - beta r: (1, 2, 4) and (-0.5, -1.5, 2).
  common, centred_sq = diagnostics.residual_split(log_z, rewards, l_theta, l_ref, beta)
  np.testing.assert_allclose(common, [7 / 3, 0.0], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(centred_sq, [np.var([1, 2, 4]), np.var([-0.5, -1.5, 2])], rtol=1e-5)
  m = {
    k: float(v)
    for k, v in diagnostics.residual_metrics(log_z, rewards, l_theta, l_ref, beta).items()
  }
  assert m["diag/common_mixed"] == pytest.approx(7 / 3)
  assert m["diag/common_sq_mixed"] == pytest.approx(49 / 9)
  assert m["diag/centred_sq_mixed"] == pytest.approx(np.var([1, 2, 4]), rel=1e-5)
  assert m["diag/centred_sq_all_wrong"] == pytest.approx(np.var([-0.5, -1.5, 2]), rel=1e-5)
  assert (m["diag/groups_mixed"], m["diag/groups_all_wrong"]) == (1.0, 1.0)
  assert (m["diag/common_all_correct"], m["diag/groups_all_correct"]) == (0.0, 0.0)  # absent: 0
  # The group mean b as log Z leaves no common mode.
  b = objectives.batch_mean_log_z(l_theta, l_ref, rewards, beta)
  np.testing.assert_allclose(
    diagnostics.residual_split(b, rewards, l_theta, l_ref, beta)[0], 0.0, atol=1e-6
  )


def test_mask_noise_is_half_the_mean_squared_difference():
  noise = diagnostics.mask_noise(
    jnp.array([1.0, 2.0]), jnp.array([0.0, 1.0]), jnp.array([0.0, 0.0]), jnp.array([0.0, 2.0])
  )
  # delta_A - delta_B: (1 - 0) - 0 = 1 and (2 - 1) - (0 - 2) = 3.
  assert float(noise) == pytest.approx(0.5 * (1 + 9) / 2)


@pytest.mark.parametrize(
  "objective,log_z,head,residual",
  [
    ("trafl", "mlp", True, True),
    ("trafl", "centred", True, True),
    ("trafl", "batch_mean", False, True),
    ("elbo_grpo", "mlp", False, False),
  ],
)
def test_step_metrics_per_objective(objective, log_z, head, residual):
  ocfg = objectives.ObjectiveConfig(objective=objective, beta=BETA, log_z=log_z)
  n = REWARDS.size
  terms = objectives.Terms(
    l_theta_N=jnp.asarray(L_THETA.reshape(-1)),
    logp_NxT=jnp.zeros((n, 1)),
    log_z_B=jnp.full((4,), 0.7) if head else jnp.zeros((0,)),
    l_theta_2xN=jnp.zeros((2, n)),
  )
  rows = objectives.Rows(
    *([None] * 4),
    rewards_N=jnp.asarray(REWARDS.reshape(-1)),
    masks_KxNxT=None,
    inputs_NxT=None,
    l_old_N=None,
    l_ref_N=jnp.asarray(L_REF.reshape(-1)),
    logp_old_NxT=None,
    logp_ref_NxT=None,
    l_ref_2xN=None,
    scored_NxT=None,
    commit_step_NxT=None,
    tokens_per_row_N=None,
  )
  m = diagnostics.step_metrics(ocfg, terms, rows, 4, jnp.asarray(LENGTH.reshape(-1)))
  assert float(m["diag/tilt"]) == pytest.approx(BETA, rel=1e-5)
  assert ("diag/head_bias" in m) == head
  assert ("diag/common_mixed" in m) == residual
  if log_z == "batch_mean":
    for kind in diagnostics.GROUP_KINDS:
      assert float(m[f"diag/common_sq_{kind}"]) == pytest.approx(0.0, abs=1e-10)
  if head:  # the head's 0.7 against each group's balancing log Z
    want = 0.7 - np.asarray(diagnostics.balance_log_z(REWARDS, L_THETA, L_REF, BETA))
    assert float(m["diag/head_bias"]) == pytest.approx(want.mean(), rel=1e-5)
