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


def _hand_token_mean(values, scored, how, group_size):
  """`objectives.token_mean` by loops: per row, per group of rows, or per token of the batch."""
  if how == "sequence":
    return np.mean([values[i][scored[i]].mean() for i in range(len(values))])
  if how == "group":
    groups = range(0, len(values), group_size)
    return np.mean([values[g : g + group_size][scored[g : g + group_size]].mean() for g in groups])
  return values[scored].mean()


@pytest.mark.parametrize("how", objectives.AGGREGATIONS)
def test_diffu_grpo_matches_hand_computation(how):
  logp_theta = np.array(
    [[-1.0, -2.0, -0.5], [-0.3, -1.2, -9.0], [-0.7, -0.2, -1.0], [-2.0, -0.1, -0.4]], np.float32
  )
  logp_old = np.array(
    [[-1.2, -1.5, -0.5], [-0.3, -2.2, -1.0], [-0.2, -0.9, -1.0], [-1.0, -0.1, -0.9]], np.float32
  )
  logp_ref = np.array(
    [[-1.1, -2.5, -0.4], [-0.5, -1.0, -3.0], [-0.7, -0.3, -1.5], [-1.5, -0.2, -0.3]], np.float32
  )
  scored = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], bool)  # lengths differ
  adv = np.array([0.5, -0.5, 1.0, -1.0], np.float32)
  eps, kl_coef = 0.5, 0.04
  per_token = np.zeros_like(logp_theta)
  kl = np.zeros_like(logp_theta)
  clipped = np.zeros_like(logp_theta)
  for i in range(4):
    for j in range(3):
      ratio = np.exp(logp_theta[i, j] - logp_old[i, j])
      surr = min(ratio * adv[i], np.clip(ratio, 1 - eps, 1 + eps) * adv[i])
      x = logp_ref[i, j] - logp_theta[i, j]
      kl[i, j] = np.exp(x) - x - 1
      per_token[i, j] = -(surr - kl_coef * kl[i, j])
      clipped[i, j] = (adv[i] > 0 and ratio > 1 + eps) or (adv[i] < 0 and ratio < 1 - eps)
  loss, metrics = objectives.diffu_grpo_loss(
    logp_theta, logp_old, logp_ref, scored, adv, eps, kl_coef, how, group_size=2
  )
  assert float(loss) == pytest.approx(_hand_token_mean(per_token, scored, how, 2), rel=1e-5)
  assert float(metrics["grpo/kl"]) == pytest.approx(_hand_token_mean(kl, scored, how, 2), rel=1e-5)
  assert 0 < float(metrics["grpo/clip_fraction"]) < 1  # rows 0, 2 and 3 have a clipped token
  assert float(metrics["grpo/clip_fraction"]) == pytest.approx(
    _hand_token_mean(clipped, scored, how, 2), rel=1e-6
  )


def test_the_three_aggregations_differ_and_token_is_exact_over_micro_batches():
  rng = np.random.default_rng(4)
  values = rng.normal(size=(6, 5)).astype(np.float32)
  scored = np.arange(5)[None] < np.array([[1], [5], [2], [4], [3], [5]])
  means = {
    how: float(objectives.token_mean(values, scored, how, group_size=3))
    for how in objectives.AGGREGATIONS
  }
  for how, got in means.items():
    assert got == pytest.approx(_hand_token_mean(values, scored, how, 3), rel=1e-5)
  assert len({round(v, 5) for v in means.values()}) == 3  # unequal lengths: three different means
  # Two micro-batches of one group each: with the batch's tokens per row their mean is the batch's
  # token mean; with each micro-batch's own count it is not.
  per_row = np.full(6, scored.sum() / 6, np.float32)
  halves = [
    float(objectives.token_mean(values[s], scored[s], "token", 3, per_row[s]))
    for s in (slice(0, 3), slice(3, 6))
  ]
  assert np.mean(halves) == pytest.approx(means["token"], rel=1e-5)
  own = [
    float(objectives.token_mean(values[s], scored[s], "token", 3))
    for s in (slice(0, 3), slice(3, 6))
  ]
  assert np.mean(own) != pytest.approx(means["token"], rel=1e-3)


def test_the_clip_takes_the_gradient_of_tokens_past_it_in_the_advantages_direction():
  """Ratios 1.0, 1.3, 2.0 and 0.4 on a row with A > 0 and one with A < 0 (eps 0.5, no KL): the clip
  zeroes the gradient of ratio 2.0 when A > 0 (more would gain) and of ratio 0.4 when A < 0; every other
  token keeps its gradient, including those past the clip against the advantage (pessimistic min)."""
  log_ratio = np.log(np.array([[1.0, 1.3, 2.0, 0.4]] * 2, np.float32))
  logp_old = np.full((2, 4), -1.0, np.float32)
  adv = np.array([1.0, -1.0], np.float32)
  scored = np.ones((2, 4), bool)

  def loss(logp_theta):
    return objectives.diffu_grpo_loss(
      logp_theta, logp_old, logp_old, scored, adv, 0.5, 0.0, "token"
    )

  grad = np.asarray(jax.grad(lambda x: loss(x)[0])(jnp.asarray(logp_old + log_ratio)))
  inactive = np.array([[0, 0, 1, 0], [0, 0, 0, 1]], bool)
  np.testing.assert_array_equal(grad[inactive], 0.0)
  assert np.all(np.abs(grad[~inactive]) > 1e-3)
  # d(-ratio * A / 8) / d log_ratio = -ratio * A / 8 where the clip is not active.
  ratio = np.exp(log_ratio)
  np.testing.assert_allclose(grad[~inactive], (-ratio * adv[:, None] / 8)[~inactive], rtol=1e-5)
  _, metrics = loss(jnp.asarray(logp_old + log_ratio))
  assert float(metrics["grpo/clip_fraction"]) == pytest.approx(2 / 8)
  assert float(metrics["grpo/ratio_mean"]) == pytest.approx(ratio.mean(), rel=1e-5)


@pytest.mark.parametrize("how", objectives.AGGREGATIONS)
def test_elbo_grpo_matches_hand_computation(how):
  l_theta = np.array([-10.0, -12.0, -8.0, -9.0], np.float32)
  l_old = np.array([-10.5, -11.0, -8.0, -9.5], np.float32)
  l_ref = np.array([-11.0, -12.0, -7.0, -9.0], np.float32)
  rng = np.random.default_rng(2)
  logp_theta = rng.normal(-2, 0.5, (4, 5)).astype(np.float32)
  logp_ref = (logp_theta + rng.normal(0, 0.3, (4, 5))).astype(np.float32)
  scored = np.arange(5)[None] < np.array([[5], [4], [2], [3]])
  adv = np.array([1.0, -1.0, 0.5, -0.5], np.float32)
  surrogate, kl = [], np.zeros((4, 5))
  for i in range(4):
    ratio = np.exp(l_theta[i] - l_old[i])
    surrogate.append(-min(ratio * adv[i], np.clip(ratio, 0.5, 1.5) * adv[i]))
    for j in range(5):
      x = logp_ref[i, j] - logp_theta[i, j]  # per token, the same masked copy: d1's k3
      kl[i, j] = np.exp(x) - x - 1
  want_kl = _hand_token_mean(kl, scored, how, 2)
  loss, metrics = objectives.elbo_grpo_loss(
    l_theta, l_old, l_ref, logp_theta, logp_ref, scored, adv, 0.5, 0.04, how, group_size=2
  )
  assert float(loss) == pytest.approx(np.mean(surrogate) + 0.04 * want_kl, rel=1e-5)
  assert float(metrics["grpo/kl"]) == pytest.approx(want_kl, rel=1e-5)
  # Ratios e^0.5, e^-1, 1, e^0.5: the clip acts on rows 0 (A > 0) and 1 (A < 0), not on row 3 (past
  # 1 + eps against its negative advantage: the min keeps the unclipped term).
  assert float(metrics["grpo/clip_fraction"]) == pytest.approx(2 / 4)


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
  with pytest.raises(ValueError, match="loss_aggregation 'batch' is not one of"):
    objectives.ObjectiveConfig(loss_aggregation="batch")


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
    commit_step_NxT=zeros_NxT,
    tokens_per_row_N=jnp.ones((n,)),
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


def test_bounded_log_z_lies_where_log_z_does():
  """For rewards in [0, 1], log Z = log E_ref[exp(beta r)] is in [0, beta]: the policy's residual reads
  the clip of the head (held fixed), and the head learns from its own unclipped residual."""
  for p in (0.0, 0.1, 0.5, 1.0):
    assert float(objectives.log_z_of(p, 2.0)) == pytest.approx(np.log(1 + (np.e**2 - 1) * p))
  terms, rows = _terms_and_rows(b=3, g=4, seed=4)
  terms = terms.replace(log_z_B=jnp.array([-1.0, 0.5, 3.0]))  # below, inside, above [0, 2]

  def grads(**kw):
    ocfg = objectives.ObjectiveConfig(beta=2.0, **kw)

    def loss(l_theta_N, log_z_B):
      t = terms.replace(l_theta_N=l_theta_N, log_z_B=log_z_B)
      return objectives.objective_loss(ocfg, t, rows, 4)[0]

    return jax.grad(loss, (0, 1))(terms.l_theta_N, terms.log_z_B)

  bounded, free = grads(log_z_bounded=True), grads()
  clipped = terms.replace(log_z_B=jnp.array([0.0, 0.5, 2.0]))
  ocfg = objectives.ObjectiveConfig(beta=2.0)
  want = jax.grad(
    lambda l_N: objectives.objective_loss(ocfg, clipped.replace(l_theta_N=l_N), rows, 4)[0]
  )
  np.testing.assert_allclose(bounded[0], want(terms.l_theta_N), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(bounded[1], free[1], rtol=1e-5)  # the head: as unbounded
  assert np.abs(np.asarray(bounded[0]) - np.asarray(free[0])).max() > 1e-3
  with pytest.raises(ValueError, match="centred"):
    objectives.ObjectiveConfig(log_z="centred", log_z_bounded=True)
