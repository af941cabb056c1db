"""TraFL's fixed point on a problem with known probabilities, against diffu-GRPO's locking.

One prompt, a one-token completion (where the surrogate is the exact log-likelihood), a vocabulary with three
correct answers. TraFL should move the policy to `p_ref * exp(beta r) / Z`, which keeps the reference's ratios
between the correct answers; diffu-GRPO should pile the mass onto fewer of them. TraFL with the exact
trajectory estimator (one sampler step commits the token) reaches the same target.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from trafl_jax import diffusion, objectives, rl, sampler
from trafl_jax import model as model_lib
from trafl_jax import state as state_lib

from .conftest import small_model_config

CFG = small_model_config(vocab_size=16, n_layers=1, n_heads=2, mlp_hidden=32)
MODEL = model_lib.Transformer(CFG)
CORRECT = np.array([8, 9, 10])
ANSWERS = np.arange(
  5, 16
)  # what the policy may answer (the rest are masked out of the toy's choice)
BETA = 2.0
G = 64
PROMPT = np.array([[11, 12, 13]], np.int32)


# The same toy on a Dream-family model: its answer is predicted from the prompt's last position.
DREAM_MODEL = model_lib.Transformer(
  dataclasses.replace(CFG, family="dream", qkv_bias=True, shift_logits=True)
)
_DISTRIBUTIONS = {}


def _distribution(params, model=MODEL):
  if model.cfg not in _DISTRIBUTIONS:

    @jax.jit
    def distribution(params):
      tokens = np.concatenate([PROMPT, [[CFG.mask_token_id]]], 1)
      logits = model.apply({"params": params}, tokens, np.ones_like(tokens, bool))[0, -1]
      logits = jnp.where(jnp.isin(jnp.arange(16), ANSWERS), logits, -jnp.inf)
      return jax.nn.softmax(logits)

    _DISTRIBUTIONS[model.cfg] = distribution
  return np.asarray(_DISTRIBUTIONS[model.cfg](params), np.float64)


def _train(objective: str, steps: int, model=MODEL, **kw):
  params = model.init(jax.random.PRNGKey(0), PROMPT, np.ones_like(PROMPT, bool))["params"]
  params = nn.unbox(jax.tree.map(lambda x: 2.0 * x, params))
  # The toy's reference: the initial model restricted to ANSWERS (other tokens get no mass).
  ref_params = params
  ocfg = objectives.ObjectiveConfig(objective=objective, beta=BETA, **kw)
  tx = state_lib.make_optimizer(
    state_lib.OptimConfig(3e-3, "constant", 0, 1.0, 0.0, 0.9, 0.99, 1e-8, 10.0, steps)
  )
  state = rl.create_state(params, tx, 3e-2, CFG.d_model, seed=1)
  prepare = jax.jit(functools.partial(rl.prepare, model=model, ocfg=ocfg, num_inner=1))
  update = jax.jit(functools.partial(rl.update, model=model, ocfg=ocfg, group_size=G))
  rng = np.random.default_rng(0)
  for step in range(steps):
    p = _distribution(state.params, model)
    answers = rng.choice(16, size=G, p=p / p.sum())
    tokens = np.concatenate([np.repeat(PROMPT, G, 0), answers[:, None]], 1).astype(np.int32)
    completion = np.zeros_like(tokens, bool)
    completion[:, -1] = True
    batch = objectives.Rollout(
      tokens_NxT=tokens,
      valid_NxT=np.ones_like(tokens, bool),
      prompt_NxT=~completion,
      completion_NxT=completion,
      rewards_N=np.isin(answers, CORRECT).astype(np.float32),
      commit_step_NxT=np.where(completion, 0, -1).astype(np.int32),  # one step commits the token
    )
    if step == 0 and objective == "trafl":
      state = state.replace(log_z=rl.set_log_z_bias(state.log_z, BETA * batch.rewards_N.mean()))
    state, metrics = update(state, batch, prepare(state, ref_params, batch), 0)
    state = state.replace(step=state.step + 1)
  return _distribution(ref_params, model), _distribution(state.params, model), metrics


def _kl(p, q):
  mask = p > 0
  return float((p[mask] * np.log(p[mask] / q[mask])).sum())


def _correct_entropy(p):
  c = p[CORRECT] / p[CORRECT].sum()
  return float(-(c * np.log(c)).sum())


@pytest.fixture(scope="module")
def trafl_run():
  return _train("trafl", 300)


def test_one_token_surrogate_is_the_exact_log_likelihood():
  params = nn.unbox(MODEL.init(jax.random.PRNGKey(0), PROMPT, np.ones_like(PROMPT, bool))["params"])
  tokens = np.array([[11, 12, 13, 9]], np.int32)
  completion = np.array([[False, False, False, True]])
  scored = diffusion.scored_positions(completion, tokens, CFG.eos_token_id)
  masks = diffusion.surrogate_masks(jax.random.PRNGKey(0), scored, "pair", 2)
  logp = diffusion.masked_token_log_probs(
    objectives.log_prob_fn(MODEL),
    params,
    tokens,
    np.ones_like(tokens, bool),
    masks,
    CFG.mask_token_id,
  )
  l_y = diffusion.surrogate_from_log_probs(logp, masks, scored)
  masked = tokens.copy()
  masked[0, -1] = CFG.mask_token_id
  logits = MODEL.apply({"params": params}, masked, np.ones_like(masked, bool))[0, -1]
  np.testing.assert_allclose(l_y[0], jax.nn.log_softmax(logits)[9], rtol=1e-5)


@pytest.fixture(scope="module")
def trajectory_run():
  rollout = sampler.SamplerConfig(1, 1, 1, temperature=1.0, remasking="random")
  return _train("trafl", 300, estimator="trajectory", rollout=rollout)


def test_trafl_reaches_the_tilted_target(trafl_run):
  _assert_reaches_the_tilted_target(*trafl_run)


def test_trafl_with_the_trajectory_estimator_reaches_the_tilted_target(trajectory_run):
  _assert_reaches_the_tilted_target(*trajectory_run)


def test_trafl_reaches_the_tilted_target_on_a_dream_model():
  _assert_reaches_the_tilted_target(*_train("trafl", 300, model=DREAM_MODEL))


def _assert_reaches_the_tilted_target(p_ref, p_theta, metrics):
  target = p_ref * np.exp(BETA * np.isin(np.arange(16), CORRECT))
  z = target.sum()
  target /= z
  assert _kl(target, p_ref) > 0.3  # the task is not trivial: the reference is far from the target
  assert _kl(target, p_theta) < 0.05
  # The reference's ratios between correct answers survive (the anti-locking property).
  np.testing.assert_allclose(
    p_theta[CORRECT] / p_theta[CORRECT].sum(), p_ref[CORRECT] / p_ref[CORRECT].sum(), atol=0.06
  )
  # The learned log Z approaches log Z = log(1 + (e^beta - 1) P_ref(correct)), inside [0, beta].
  log_z = float(metrics["trafl/log_z_mean"])
  assert 0.0 <= log_z <= BETA
  assert log_z == pytest.approx(np.log(z), abs=0.15)


def test_diffu_grpo_concentrates_on_fewer_correct_answers(trafl_run):
  p_ref, p_trafl, _ = trafl_run
  _, p_grpo, _ = _train("diffu_grpo", 300, clip_eps=0.5, kl_coef=0.0, prompt_mask_prob=0.0)
  assert p_grpo[CORRECT].sum() > 0.9  # reward-maximizing: almost all mass on correct answers
  assert _correct_entropy(p_grpo) < _correct_entropy(p_trafl) - 0.2
