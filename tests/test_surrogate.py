"""The sequence-level surrogate l(y|x): scored positions, shared coupled masks, exactness, unbiasedness."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from trafl_jax import diffusion, objectives, rl
from trafl_jax import model as model_lib

from .conftest import FAMILIES, family_config, small_model_config

CFG = small_model_config(n_kv_heads=4)
MODEL = model_lib.Transformer(CFG)


def _params(seed):
  p = MODEL.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), bool))
  return jax.tree.map(lambda x: 3.0 * x, nn.unbox(p["params"]))


def _apply(params, tokens, valid):
  return MODEL.apply({"params": params}, tokens, valid)


_LOG_PROBS = objectives.log_prob_fn(MODEL)


def _batch(completion_len, eos_at=None, batch=2):
  prompt = np.random.default_rng(0).integers(5, 32, (batch, 5))
  completion = np.random.default_rng(1).integers(5, 32, (batch, completion_len))
  if eos_at is not None:
    completion[:, eos_at:] = CFG.eos_token_id
  tokens = np.concatenate([prompt, completion], 1).astype(np.int32)
  is_completion = np.zeros_like(tokens, bool)
  is_completion[:, 5:] = True
  return jnp.asarray(tokens), jnp.ones_like(tokens, bool), jnp.asarray(is_completion)


def test_scored_positions_stop_after_the_first_eos():
  tokens, _, completion = _batch(6, eos_at=3)
  scored = np.asarray(diffusion.scored_positions(completion, tokens, CFG.eos_token_id))
  assert scored[:, :5].sum() == 0 and scored[:, 5:9].all() and not scored[:, 9:].any()
  tokens, _, completion = _batch(6)
  assert np.asarray(diffusion.scored_positions(completion, tokens, 3))[:, 5:].all()


def test_pair_masks_cover_each_scored_token_exactly_once():
  tokens, _, completion = _batch(12, eos_at=9)
  scored = diffusion.scored_positions(completion, tokens, CFG.eos_token_id)
  masks = np.asarray(diffusion.surrogate_masks(jax.random.PRNGKey(0), scored, "pair", 4))
  assert masks.shape == (4, 2, 17)
  np.testing.assert_array_equal(masks[0] ^ masks[2], np.asarray(scored))
  np.testing.assert_array_equal(masks[0] & masks[2], False)
  assert not (masks & ~np.asarray(scored)).any()
  with pytest.raises(ValueError, match="even"):
    diffusion.surrogate_masks(jax.random.PRNGKey(0), scored, "pair", 3)
  one = np.asarray(diffusion.surrogate_masks(jax.random.PRNGKey(0), scored, "one_step", 1))
  np.testing.assert_array_equal(one[0], np.asarray(scored))


def _surrogate(params, tokens, valid, masks, scored):
  logp = diffusion.masked_token_log_probs(
    _LOG_PROBS, params, tokens, valid, masks, CFG.mask_token_id
  )
  return diffusion.surrogate_from_log_probs(logp, masks, scored)


def test_shared_masks_give_zero_difference_for_equal_models():
  tokens, valid, completion = _batch(10, eos_at=7)
  scored = diffusion.scored_positions(completion, tokens, CFG.eos_token_id)
  params = _params(0)
  for estimator, k in (("pair", 2), ("random_t", 3), ("one_step", 1)):
    masks = diffusion.surrogate_masks(jax.random.PRNGKey(5), scored, estimator, k)
    l_theta = _surrogate(params, tokens, valid, masks, scored)
    l_ref = _surrogate(jax.tree.map(jnp.copy, params), tokens, valid, masks, scored)
    np.testing.assert_array_equal(l_theta - l_ref, 0.0)
    assert np.all(np.asarray(l_theta) < 0)


def test_one_token_completion_is_exact():
  tokens, valid, completion = _batch(1)
  scored = diffusion.scored_positions(completion, tokens, CFG.eos_token_id)
  params = _params(1)
  masked = tokens.at[:, 5].set(CFG.mask_token_id)
  exact = diffusion.token_log_probs(_apply(params, masked, valid), tokens)[:, 5]
  for seed in range(5):
    masks = diffusion.surrogate_masks(jax.random.PRNGKey(seed), scored, "pair", 2)
    np.testing.assert_allclose(_surrogate(params, tokens, valid, masks, scored), exact, rtol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_objectives_log_probs_are_the_familys_prediction_of_each_masked_token(family):
  """`log_prob_fn` (what every objective scores with) reads a masked position's prediction where the
  family makes it: LLaDA from the position itself, Dream from the position before it (a Dream model
  whose head reads position i - 1's state)."""
  cfg = family_config(family, n_kv_heads=4)
  model = model_lib.Transformer(cfg)
  tokens, valid, _ = _batch(3)
  p = model.init(jax.random.PRNGKey(3), tokens, valid)
  params = jax.tree.map(lambda x: 3.0 * x, nn.unbox(p["params"]))
  masked = tokens.at[:, 6].set(CFG.mask_token_id)
  got = objectives.log_prob_fn(model)(params, masked, valid, tokens)[:, 6]
  source = 5 if family == "dream" else 6  # the position whose state predicts position 6
  unshifted = model_lib.Transformer(dataclasses.replace(cfg, shift_logits=False))
  raw = unshifted.apply({"params": params}, masked, valid)
  want = jax.nn.log_softmax(raw[:, source])[np.arange(2), tokens[:, 6]]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_two_token_estimate_is_unbiased_for_its_elbo():
  """The Monte Carlo mean over masks equals the expectation enumerated over every mask pattern."""
  tokens, valid, completion = _batch(2, batch=1)
  scored = diffusion.scored_positions(completion, tokens, CFG.eos_token_id)
  params = _params(2)

  def lp(mask_positions):
    x = tokens
    for j in mask_positions:
      x = x.at[:, 5 + j].set(CFG.mask_token_id)
    return np.asarray(diffusion.token_log_probs(_apply(params, x, valid), tokens))[0, 5:]

  both, only0, only1 = lp([0, 1]), lp([0]), lp([1])
  # t ~ U(0.2, 0.8); each token in M1 with probability t; M2 is the complement.
  e_t2 = (0.8**3 - 0.2**3) / 3 / 0.6  # E[t^2]
  e_t1 = 0.5
  p_both = e_t2  # M1 = {0, 1}, M2 empty (left out)
  p_none = 1 - 2 * e_t1 + e_t2  # M1 empty, M2 = {0, 1}
  p_one = e_t1 - e_t2  # M1 = {0} (or {1}), M2 the other
  l_both = both.sum()  # (2 / 2) * sum over both tokens, both masked
  l_split = (2 * only0[0] + 2 * only1[1]) / 2
  exact = (p_both + p_none) * l_both + 2 * p_one * l_split

  draws = 4000
  fn = jax.jit(
    jax.vmap(
      lambda key: _surrogate(
        params, tokens, valid, diffusion.surrogate_masks(key, scored, "pair", 2), scored
      )[0]
    )
  )
  estimates = np.asarray(fn(jax.random.split(jax.random.PRNGKey(0), draws)))
  stderr = estimates.std() / np.sqrt(draws)
  assert abs(estimates.mean() - exact) < 4 * stderr + 1e-5
  assert l_split != pytest.approx(l_both)  # the two patterns differ: the test has teeth


def test_length_normalize_divides_by_scored_length():
  tokens, valid, completion = _batch(8, eos_at=5)
  scored = diffusion.scored_positions(completion, tokens, CFG.eos_token_id)
  masks = diffusion.surrogate_masks(jax.random.PRNGKey(1), scored, "pair", 2)
  logp = diffusion.masked_token_log_probs(
    _LOG_PROBS, _params(0), tokens, valid, masks, CFG.mask_token_id
  )
  raw = diffusion.surrogate_from_log_probs(logp, masks, scored)
  normalized = diffusion.surrogate_from_log_probs(logp, masks, scored, length_normalize=True)
  np.testing.assert_allclose(normalized, raw / 6.0, rtol=1e-6)


@pytest.mark.parametrize("score_eos_fill", [True, False])
def test_the_eos_fill_is_masked_and_scored_with_the_answer(score_eos_fill):
  """By default `l` covers the whole completion, the EOS fill included, so the answer's length is inside
  the likelihood; `score_eos_fill=False` stops at the first EOS and leaves the fill visible."""
  tokens, valid, completion = _batch(6, eos_at=2)  # two answer tokens, EOS, then three fill EOS
  steps = jnp.where(completion, 0, -1)
  rollout = objectives.Rollout(tokens, valid, valid & ~completion, completion, jnp.zeros(2), steps)
  ocfg = objectives.ObjectiveConfig(score_eos_fill=score_eos_fill, num_masks=4)
  state = rl.create_state(_params(0), optax.sgd(0.1), 1e-3, CFG.d_model, seed=0)
  prepare = jax.jit(functools.partial(rl.prepare, model=MODEL, ocfg=ocfg, num_inner=1))
  prepared = prepare(state, _params(1), rollout)
  scored = np.asarray(prepared.scored_NxT)
  fill = np.asarray(completion) & (np.arange(11) >= 5 + 3)
  assert scored[:, 5:].sum(-1).tolist() == ([6, 6] if score_eos_fill else [3, 3])
  masks = np.asarray(prepared.masks_IxKxNxT[0])
  assert masks[:, fill].any() == score_eos_fill  # the fill is masked (predicted) only when scored
  # l is the surrogate over exactly those positions, with those masks.
  logp = diffusion.masked_token_log_probs(
    _LOG_PROBS, state.params, tokens, valid, masks, CFG.mask_token_id
  )
  want = diffusion.surrogate_from_log_probs(logp, masks, jnp.asarray(scored))
  np.testing.assert_allclose(np.asarray(prepared.l_old_IxN[0]), np.asarray(want), rtol=1e-5)


def test_independent_halves_keep_a_pair_together():
  a, b = diffusion.independent_halves("pair", 4)  # masks: M1, M2, ~M1, ~M2
  assert a.tolist() == [0, 2] and b.tolist() == [1, 3]
  a, b = diffusion.independent_halves("random_t", 4)
  assert a.tolist() == [0, 2] and b.tolist() == [1, 3]
  with pytest.raises(ValueError, match="multiple of 4"):
    diffusion.independent_halves("pair", 2)  # a mask and its complement are not independent
  with pytest.raises(ValueError, match="product residual"):
    objectives.ObjectiveConfig(residual="product", num_masks=2)


def test_the_product_residual_is_unbiased_for_the_exact_square():
  """With the policy and the reference apart, the residual `delta = l_theta - l_ref` (log Z = 0, r = 0)
  is noisy over the masks. Over many draws, `delta_A * delta_B` averages to `E[delta]^2` (the square
  of the exact residual), while `delta^2` adds the masks' variance."""
  tokens, valid, completion = _batch(6, batch=1)
  scored = completion
  theta, ref = _params(0), _params(1)
  halves = diffusion.independent_halves("pair", 4)

  @jax.jit
  def deltas(key):
    masks = diffusion.surrogate_masks(key, scored, "pair", 4)

    def surrogate(params, idx):
      m = masks[idx]
      lp = diffusion.masked_token_log_probs(_LOG_PROBS, params, tokens, valid, m, CFG.mask_token_id)
      return diffusion.surrogate_from_log_probs(lp, m, scored)[0]

    return jnp.stack([surrogate(theta, h) - surrogate(ref, h) for h in halves])

  d = np.asarray(jax.lax.map(deltas, jax.random.split(jax.random.PRNGKey(0), 4000)), np.float64)
  exact_square = d.mean() ** 2  # E[delta]^2 from all 8,000 half-draws
  product, square = (d[:, 0] * d[:, 1]).mean(), (d**2).mean()
  noise = d.var()
  assert noise > 0.05 * exact_square  # the masks' noise is not negligible here
  assert abs(product - exact_square) < 4 * (d[:, 0] * d[:, 1]).std() / np.sqrt(len(d))
  assert square == pytest.approx(exact_square + noise, rel=1e-6)  # the square's bias: Var_M
  # The loss: trafl_product_loss is the mean product of the two residuals.
  loss, _ = objectives.trafl_product_loss(
    jnp.zeros(1),
    jnp.asarray(d.T[:, None, :]),
    jnp.zeros((2, 1, len(d))),
    jnp.zeros((1, len(d))),
    1.0,
  )
  assert float(loss) == pytest.approx(product, rel=1e-5)
