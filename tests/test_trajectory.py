"""The exact trajectory estimator (`estimator = "trajectory"`): on one token it is the exact
log-likelihood; on a whole rollout it is the log-probability the sampler itself saw when it drew the
path; its settings are checked."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from configs import math as math_config
from trafl_jax import config_lib, objectives, posttrain, rl, sampler
from trafl_jax import model as model_lib

from .conftest import FAMILIES, family_config, small_model_config

CFG = small_model_config(vocab_size=48)
MODEL = model_lib.Transformer(CFG)
PROMPT_LEN = 6


@pytest.fixture(scope="module")
def params():
  p = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), bool))
  return jax.tree.map(lambda x: x * 2.0, nn.unbox(p["params"]))


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
  """(model, params) of each family: the estimator replays the sampler's passes, shifted or not."""
  model = model_lib.Transformer(family_config(request.param, vocab_size=48))
  p = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), bool))
  return model, jax.tree.map(lambda x: x * 2.0, nn.unbox(p["params"]))


def _rollout_cfg(**kw):
  values = dict(gen_length=8, steps=4, block_length=4, temperature=1.0, remasking="random")
  return sampler.SamplerConfig(**{**values, **kw})


def _ocfg(scfg, **kw):
  return objectives.ObjectiveConfig(estimator="trajectory", rollout=scfg, **kw)


def _prompts(batch, seed=1):
  """Left-padded prompts of different lengths (pad positions hold arbitrary ids)."""
  rng = np.random.default_rng(seed)
  prompt = rng.integers(5, CFG.vocab_size, (batch, PROMPT_LEN)).astype(np.int32)
  valid = np.ones((batch, PROMPT_LEN), bool)
  valid[1::2, :2] = False
  return prompt, valid


def _prepared_l(params, ref_params, rollout, ocfg, model=MODEL):
  state = rl.create_state(params, optax.sgd(0.1), 1e-3, CFG.d_model, seed=0)
  prepare = jax.jit(functools.partial(rl.prepare, model=model, ocfg=ocfg, num_inner=1))
  return prepare(state, ref_params, rollout)


def test_one_token_trajectory_is_the_exact_log_likelihood(params):
  scfg = _rollout_cfg(gen_length=1, steps=1, block_length=1)
  prompt, valid = _prompts(2)
  tokens = np.concatenate([prompt, [[9], [17]]], 1).astype(np.int32)
  rollout = posttrain.assemble_rollout(prompt, valid, tokens[:, -1:], np.zeros(2), np.zeros((2, 1)))
  prepared = _prepared_l(params, params, rollout, _ocfg(scfg))
  masked = tokens.copy()
  masked[:, -1] = CFG.mask_token_id
  logits = MODEL.apply({"params": params}, masked, np.asarray(rollout.valid_NxT))[:, -1]
  want = jax.nn.log_softmax(logits)[np.arange(2), tokens[:, -1]]
  np.testing.assert_allclose(prepared.l_ref_IxN[0], want, rtol=1e-5)
  np.testing.assert_allclose(prepared.l_old_IxN[0], want, rtol=1e-5)


@pytest.mark.parametrize(
  "temperature,cfg_scale,top_p",
  [(1.0, 0.0, 1.0), (0.7, 0.0, 1.0), (1.0, 1.5, 1.0), (1.0, 0.0, 0.9)],
)
def test_trajectory_equals_the_log_probs_the_sampler_saw(fam, temperature, cfg_scale, top_p):
  model, params = fam
  scfg = _rollout_cfg(temperature=temperature, cfg_scale=cfg_scale, top_p=top_p)
  n = 16
  prompt, valid = _prompts(n)
  gen = jax.jit(functools.partial(sampler.generate, model=model, cfg=scfg))
  completion, commit_step, logp = map(
    np.asarray, gen(params, prompt, valid, jax.random.PRNGKey(5))[:3]
  )
  # Rows where a sampled MASK was committed and the position committed again later (LLaDA's
  # semantics; only the last commit is recorded, so the path misses the MASK's factor) are left out:
  # with a random model's flat distributions a few rows have one.
  clean_N = np.all(
    [(commit_step == s).sum(-1) == k for s, k in enumerate(sampler.commit_schedule(scfg))], axis=0
  )
  assert clean_N.sum() >= n // 2
  assert np.all(logp[clean_N] < 0) and np.all(logp[clean_N] > -4 * np.log(CFG.vocab_size))
  rollout = posttrain.assemble_rollout(prompt, valid, completion, np.zeros(n), commit_step)
  score = jax.jit(functools.partial(objectives.trajectory_log_probs, model=model, scfg=scfg))
  logp_NxT = np.asarray(
    score(
      params=params,
      tokens_NxT=rollout.tokens_NxT,
      valid_NxT=rollout.valid_NxT,
      commit_step_NxT=rollout.commit_step_NxT,
    )
  )
  np.testing.assert_array_equal(logp_NxT[:, :PROMPT_LEN], 0.0)
  np.testing.assert_allclose(logp_NxT[clean_N, PROMPT_LEN:], logp[clean_N], rtol=1e-5, atol=1e-5)
  if cfg_scale == 0:  # the post-training steps (no guidance there): l_old, l_ref and logp
    prepared = _prepared_l(params, params, rollout, _ocfg(scfg), model)
    want_N = logp[clean_N].sum(-1)
    np.testing.assert_allclose(np.asarray(prepared.l_old_IxN[0])[clean_N], want_N, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(prepared.l_ref_IxN[0])[clean_N], want_N, rtol=1e-5)
    logp_old_NxT = np.asarray(prepared.logp_old_IxNxT[0])
    np.testing.assert_allclose(logp_old_NxT[clean_N, PROMPT_LEN:], logp[clean_N], atol=1e-5)
  # The path's states matter: the same tokens committed in another order score differently.
  reordered = np.asarray(rollout.commit_step_NxT).copy()
  reordered[:, PROMPT_LEN:] = reordered[:, PROMPT_LEN:][:, ::-1]
  other = np.asarray(
    score(
      params=params,
      tokens_NxT=rollout.tokens_NxT,
      valid_NxT=rollout.valid_NxT,
      commit_step_NxT=reordered,
    )
  )
  # (float64: under top-p a reordered path may commit a filtered token, float32's lowest logit)
  assert np.abs(other.astype(np.float64).sum(-1) - logp.sum(-1)).max() > 1e-2


def test_trajectory_update_has_a_gradient_through_every_step(params):
  """`l_theta` under a gradient: the loss moves parameters, and each step's pass contributes (a path
  scored with fewer steps, as if the later ones had not run, gives another gradient)."""
  scfg = _rollout_cfg()
  prompt, valid = _prompts(4)
  completion, commit_step, _ = jax.jit(functools.partial(sampler.generate, model=MODEL, cfg=scfg))(
    params, prompt, valid, jax.random.PRNGKey(2)
  )[:3]
  rollout = posttrain.assemble_rollout(prompt, valid, completion, np.zeros(4), commit_step)

  def l_sum(p, steps):
    logp = objectives.trajectory_log_probs(
      MODEL,
      p,
      rollout.tokens_NxT,
      rollout.valid_NxT,
      rollout.commit_step_NxT,
      _rollout_cfg(steps=steps),
    )
    return logp.sum()

  full = jax.grad(l_sum)(params, 4)
  partial = jax.grad(l_sum)(params, 2)
  norm = lambda g: float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g))))
  diff = jax.tree.map(lambda a, b: a - b, full, partial)
  assert norm(full) > 0 and norm(diff) > 1e-3 * norm(full)


@pytest.mark.parametrize(
  "kw,named",
  [
    (dict(remasking="low_confidence"), "needs remasking 'random'"),
    (dict(temperature=0.0), "needs temperature > 0"),
  ],
)
def test_trajectory_needs_random_remasking_and_a_temperature(kw, named):
  with pytest.raises(ValueError, match=named):
    _ocfg(_rollout_cfg(**kw))


@pytest.mark.parametrize(
  "kw,named",
  [
    (dict(objective="diffu_grpo"), "one-step token estimator"),
    (dict(residual="product", num_masks=4), "use residual 'square'"),
    (dict(score_eos_fill=False), "score_eos_fill must be True"),
  ],
)
def test_trajectory_settings_that_do_not_apply_are_named(kw, named):
  with pytest.raises(ValueError, match=named):
    _ocfg(_rollout_cfg(), **kw)
  with pytest.raises(ValueError, match="give the sampler"):
    objectives.ObjectiveConfig(estimator="trajectory")


def test_config_selects_the_trajectory_estimator_and_names_low_confidence():
  config = math_config.get_config("tiny")
  config.rl.estimator = "trajectory"
  with pytest.raises(ValueError, match="needs remasking 'random'"):
    config_lib.posttrain_config(config)
  config.rl.remasking = "random"
  pcfg = config_lib.posttrain_config(config)
  assert pcfg.ocfg.rollout == pcfg.scfg
  assert objectives.estimator_of(pcfg.ocfg) is objectives.ESTIMATORS["trajectory"]
  assert objectives.estimator_of(pcfg.ocfg).forward_passes(pcfg.ocfg) == config.rl.sample_steps
  config.rl.estimator = "pair"
  assert (
    objectives.estimator_of(config_lib.objective_config(config))
    is (objectives.ESTIMATORS["sequence"])
  )
