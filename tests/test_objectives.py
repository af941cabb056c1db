"""Objectives against hand computations, and TraFL's balance property."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trafl_jax import objectives


def test_residual_and_gradient_vanish_when_the_balance_holds():
  rng = np.random.default_rng(0)
  beta = 2.0
  rewards = rng.integers(0, 2, (3, 4)).astype(np.float32)
  l_ref = rng.normal(-20, 3, (3, 4)).astype(np.float32)
  log_z = rng.uniform(0, beta, 3).astype(np.float32)
  # The balance: log Z + l_theta - l_ref = beta * r for every sample.
  l_theta = l_ref + beta * rewards - log_z[:, None]
  loss, metrics = objectives.trafl_loss(log_z, l_theta, l_ref, rewards, beta)
  assert float(loss) == pytest.approx(0.0, abs=1e-10)
  grads = jax.grad(lambda z, lt: objectives.trafl_loss(z, lt, l_ref, rewards, beta)[0], (0, 1))(
    jnp.asarray(log_z), jnp.asarray(l_theta)
  )
  for g in grads:
    np.testing.assert_allclose(g, 0.0, atol=1e-6)
  # Off balance, the loss is the mean squared residual and its gradient pushes l_theta toward it.
  shifted = l_theta + 0.5
  loss, _ = objectives.trafl_loss(log_z, shifted, l_ref, rewards, beta)
  assert float(loss) == pytest.approx(0.25)
  g = jax.grad(lambda lt: objectives.trafl_loss(log_z, lt, l_ref, rewards, beta)[0])(shifted)
  np.testing.assert_allclose(g, 2 * 0.5 / 12, rtol=1e-6)


def test_batch_mean_log_z_zeroes_each_prompts_mean_residual():
  rng = np.random.default_rng(1)
  rewards = rng.integers(0, 2, (3, 5)).astype(np.float32)
  l_theta, l_ref = rng.normal(-10, 2, (2, 3, 5)).astype(np.float32)
  log_z = objectives.batch_mean_log_z(l_theta, l_ref, rewards, 1.5)
  delta = objectives.trafl_residual(log_z, l_theta, l_ref, rewards, 1.5)
  np.testing.assert_allclose(np.asarray(delta).mean(1), 0.0, atol=1e-5)
  # When the policy equals the reference, log Z is beta times the group's success rate: in [0, beta].
  log_z = objectives.batch_mean_log_z(l_ref, l_ref, rewards, 1.5)
  np.testing.assert_allclose(log_z, 1.5 * rewards.mean(1), rtol=1e-6)


def test_importance_weights_are_clipped_and_constant():
  l_theta = jnp.array([[0.0, 1.0, -1.0]])
  l_old = jnp.zeros((1, 3))
  w = objectives.importance_weights(l_theta, l_old, 0.2)
  np.testing.assert_allclose(w, [[1.0, 1.2, 0.8]], rtol=1e-6)
  g = jax.grad(lambda lt: objectives.importance_weights(lt, l_old, 0.2).sum())(l_theta)
  np.testing.assert_array_equal(g, 0.0)


def test_diffu_grpo_matches_hand_computation():
  logp_theta = np.array([[-1.0, -2.0, -0.5], [-0.3, -1.2, -9.0]], np.float32)
  logp_old = np.array([[-1.2, -1.5, -0.5], [-0.3, -2.2, -1.0]], np.float32)
  logp_ref = np.array([[-1.1, -2.5, -0.4], [-0.5, -1.0, -3.0]], np.float32)
  scored = np.array([[1, 1, 1], [1, 1, 0]], bool)
  adv = np.array([0.5, -0.5], np.float32)
  eps, kl_coef = 0.5, 0.04
  want = []
  for i in range(2):
    terms = []
    for j in range(3):
      if not scored[i, j]:
        continue
      ratio = np.exp(logp_theta[i, j] - logp_old[i, j])
      surr = min(ratio * adv[i], np.clip(ratio, 1 - eps, 1 + eps) * adv[i])
      x = logp_ref[i, j] - logp_theta[i, j]
      terms.append(-(surr - kl_coef * (np.exp(x) - x - 1)))
    want.append(np.mean(terms))
  loss, metrics = objectives.diffu_grpo_loss(
    logp_theta, logp_old, logp_ref, scored, adv, eps, kl_coef
  )
  assert float(loss) == pytest.approx(np.mean(want), rel=1e-5)
  assert float(metrics["grpo/kl"]) > 0


def test_elbo_grpo_matches_hand_computation():
  l_theta = np.array([-10.0, -12.0, -8.0], np.float32)
  l_old = np.array([-10.5, -11.0, -8.0], np.float32)
  l_ref = np.array([-11.0, -12.0, -7.0], np.float32)
  length = np.array([5.0, 4.0, 2.0], np.float32)
  adv = np.array([1.0, -1.0, 0.0], np.float32)
  want = []
  for i in range(3):
    ratio = np.exp(l_theta[i] - l_old[i])
    surr = min(ratio * adv[i], np.clip(ratio, 0.5, 1.5) * adv[i])
    x = (l_ref[i] - l_theta[i]) / length[i]
    want.append(-(surr - 0.04 * (np.exp(x) - x - 1)))
  loss, _ = objectives.elbo_grpo_loss(l_theta, l_old, l_ref, length, adv, 0.5, 0.04)
  assert float(loss) == pytest.approx(np.mean(want), rel=1e-5)


def test_wd1_matches_hand_computation():
  l_theta = np.array([[-3.0, -4.0, -5.0]], np.float32)
  adv = objectives.group_advantages(np.array([[1.0, 0.0, 0.0]], np.float32))
  np.testing.assert_allclose(adv, [[2 / 3, -1 / 3, -1 / 3]], rtol=1e-6)
  pos = np.exp(adv[0]) / np.exp(adv[0]).sum()
  neg = np.exp(-adv[0]) / np.exp(-adv[0]).sum()
  loss, _ = objectives.wd1_loss(l_theta, adv)
  assert float(loss) == pytest.approx(float(((neg - pos) * l_theta[0]).sum()), rel=1e-6)
  # Raising the likelihood of the rewarded sample lowers the loss.
  g = jax.grad(lambda lt: objectives.wd1_loss(lt, adv)[0])(jnp.asarray(l_theta))
  assert g[0, 0] < 0 and g[0, 1] > 0


def test_log_z_head_depends_on_the_prompt_only_and_starts_at_its_bias():
  head = objectives.LogZHead(width=8)
  hidden = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 8))
  prompt = jnp.array([[1, 1, 1, 0, 0, 0]] * 2, bool)
  params = head.init(jax.random.PRNGKey(1), hidden, prompt)
  out = head.apply(params, hidden, prompt)
  np.testing.assert_allclose(out, 0.0)  # zero-initialized output layer: starts at its bias
  changed = hidden.at[:, 4].set(100.0)  # completion positions do not enter
  params = jax.tree.map(lambda x: x + 0.1, params)
  np.testing.assert_allclose(
    head.apply(params, hidden, prompt), head.apply(params, changed, prompt)
  )


def test_bad_objective_settings_are_named():
  with pytest.raises(ValueError, match="objective"):
    objectives.ObjectiveConfig(objective="ppo")
  with pytest.raises(ValueError, match="log_z"):
    objectives.ObjectiveConfig(log_z="learned")


def _terms_and_rows(b: int, g: int, seed: int):
  """A synthetic batch of b prompt groups of g rows: every field the TraFL loss reads."""
  rng = np.random.default_rng(seed)
  n = b * g
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  l_ref_N = f32(rng.normal(-10, 2, n))
  l_theta_N = l_ref_N + f32(rng.normal(0, 1, n))
  terms = objectives.Terms(
    l_theta_N=l_theta_N,
    logp_NxT=jnp.zeros((n, 1)),
    log_z_B=f32(rng.uniform(0, 4, b)),  # far from the balancing value: a large common mode
    l_theta_2xN=jnp.stack([l_theta_N, l_theta_N]) + f32(rng.normal(0, 0.3, (2, n))),
  )
  zeros_NxT = jnp.zeros((n, 1))
  rows = objectives.Rows(
    tokens_NxT=zeros_NxT,
    valid_NxT=zeros_NxT,
    prompt_NxT=zeros_NxT,
    completion_NxT=zeros_NxT,
    rewards_N=f32(rng.integers(0, 2, n)),
    masks_KxNxT=jnp.zeros((1, n, 1)),
    inputs_NxT=zeros_NxT,
    l_old_N=l_theta_N + f32(rng.normal(0, 0.1, n)),
    l_ref_N=l_ref_N,
    logp_old_NxT=zeros_NxT,
    logp_ref_NxT=zeros_NxT,
    l_ref_2xN=jnp.stack([l_ref_N, l_ref_N]) + f32(rng.normal(0, 0.3, (2, n))),
    scored_NxT=zeros_NxT,
  )
  return terms, rows


@pytest.mark.parametrize(
  "extra", [{}, {"importance_weights": True}, {"residual": "product", "num_masks": 4}]
)
def test_centred_log_z_gives_the_policy_batch_means_gradient_and_the_head_mlps(extra):
  terms, rows = _terms_and_rows(b=3, g=4, seed=2)

  def grads(log_z: str):
    ocfg = objectives.ObjectiveConfig(beta=2.0, log_z=log_z, **extra)

    def loss(l_theta_N, l_theta_2xN, log_z_B):
      t = terms.replace(l_theta_N=l_theta_N, l_theta_2xN=l_theta_2xN, log_z_B=log_z_B)
      return objectives.objective_loss(ocfg, t, rows, 4)[0]

    return jax.grad(loss, (0, 1, 2))(terms.l_theta_N, terms.l_theta_2xN, terms.log_z_B)

  centred, batch_mean, mlp = grads("centred"), grads("batch_mean"), grads("mlp")
  policy = 1 if extra.get("residual") == "product" else 0  # which l_theta the loss reads
  np.testing.assert_allclose(centred[policy], batch_mean[policy], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(centred[2], mlp[2], rtol=1e-5, atol=1e-7)
  # Not vacuous: the head learns, and mlp's policy gradient carries the common mode centred removes.
  assert np.abs(np.asarray(centred[2])).min() > 1e-3
  assert np.abs(np.asarray(centred[policy]) - np.asarray(mlp[policy])).max() > 1e-2
  # The common mode is gone: each group's policy gradient sums to zero (unweighted square residual).
  if not extra:
    np.testing.assert_allclose(np.asarray(centred[0]).reshape(3, 4).sum(1), 0.0, atol=1e-6)


def test_centred_log_z_reports_the_policys_loss_and_the_heads():
  terms, rows = _terms_and_rows(b=3, g=4, seed=3)
  run = lambda log_z: objectives.objective_loss(
    objectives.ObjectiveConfig(beta=2.0, log_z=log_z), terms, rows, 4
  )
  (centred, metrics), (batch_mean, _), (mlp, mlp_metrics) = map(
    run, ("centred", "batch_mean", "mlp")
  )
  assert float(centred) == pytest.approx(float(batch_mean), rel=1e-6)
  assert float(metrics["trafl/head_loss"]) == pytest.approx(float(mlp), rel=1e-6)
  assert float(metrics["trafl/log_z_mean"]) == pytest.approx(float(mlp_metrics["trafl/log_z_mean"]))
  assert objectives.learned_log_z(objectives.ObjectiveConfig(log_z="centred"))
