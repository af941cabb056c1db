"""The GRPO baselines as d1 runs them: several inner updates per rollout batch against the rollout
policy's log-probabilities (the ratio leaves 1 and the clip acts), and the d1 config variant."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from configs import math as math_config
from trafl_jax import config_lib, diffusion, objectives, rl
from trafl_jax import model as model_lib

from .conftest import small_model_config

CFG = small_model_config()
MODEL = model_lib.Transformer(CFG)
PROMPT, COMPLETION, GROUP = 4, 6, 4


def _rollout(seed: int = 0) -> objectives.Rollout:
  rng = np.random.default_rng(seed)
  n = 2 * GROUP
  prompt = np.repeat(rng.integers(5, 32, (2, PROMPT)), GROUP, 0)
  completion = rng.integers(5, 32, (n, COMPLETION))
  completion[::3, 4:] = CFG.eos_token_id
  is_completion = np.zeros((n, PROMPT + COMPLETION), bool)
  is_completion[:, PROMPT:] = True
  return objectives.Rollout(
    tokens_NxT=np.concatenate([prompt, completion], 1).astype(np.int32),
    valid_NxT=np.ones((n, PROMPT + COMPLETION), bool),
    prompt_NxT=~is_completion,
    completion_NxT=is_completion,
    rewards_N=np.array([1, 0, 0, 1, 0, 0, 0, 1], np.float32),
    commit_step_NxT=np.where(is_completion, 0, -1).astype(np.int32),
  )


def _state():
  params = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), bool))
  params = nn.unbox(params["params"])
  return rl.create_state(params, optax.adam(0.05), 1e-3, CFG.d_model, seed=1), params


@pytest.mark.parametrize("objective", ["diffu_grpo", "elbo_grpo"])
def test_inner_updates_score_against_the_rollout_policy_so_the_clip_acts(objective):
  """prepare scores every inner update's masks under the rollout policy once; the first update's ratio
  is 1 (nothing clipped) and later updates, on their own masks, see the moved policy."""
  inner = 4
  ocfg = objectives.ObjectiveConfig(objective=objective, loss_aggregation="group", clip_eps=0.2)
  prepare = jax.jit(functools.partial(rl.prepare, model=MODEL, ocfg=ocfg, num_inner=inner))
  update = jax.jit(functools.partial(rl.update, model=MODEL, ocfg=ocfg, group_size=GROUP))
  state, ref_params = _state()
  rollout = _rollout()
  prepared = prepare(state, ref_params, rollout)
  if objective == "diffu_grpo":  # every update draws its own prompt mask
    assert not np.array_equal(prepared.inputs_IxNxT[0], prepared.inputs_IxNxT[1])
  logged = []
  for i in range(inner):
    state, metrics = update(state, rollout, prepared, i)
    logged.append({k: float(v) for k, v in metrics.items()})
  assert logged[0]["grpo/ratio_mean"] == pytest.approx(1.0, abs=1e-4)
  assert logged[0]["grpo/clip_fraction"] == 0.0
  assert logged[0]["grpo/kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts at the reference
  assert abs(logged[-1]["grpo/ratio_mean"] - 1.0) > 1e-2
  assert logged[-1]["grpo/clip_fraction"] > 0
  assert logged[-1]["grpo/kl"] > 1e-4


def test_sequence_estimator_gives_each_tokens_log_prob_in_the_copy_that_masks_it():
  """elbo_grpo's per-token KL reads the pair's per-token log-probabilities: each scored token's
  log-probability in the one copy of the pair that masks it, and 0 off the scored tokens."""
  _, params = _state()
  rollout = _rollout()
  ocfg = objectives.ObjectiveConfig(objective="elbo_grpo")
  scored = rollout.completion_NxT
  masks, _ = objectives.estimator_of(ocfg).draw(
    jax.random.PRNGKey(3), rollout, scored, ocfg, CFG.mask_token_id
  )
  rows = objectives.Rows.of(
    rollout,
    objectives.Prepared(
      masks_IxKxNxT=masks[None],
      inputs_IxNxT=rollout.tokens_NxT[None],
      l_old_IxN=jnp.zeros((1, 8)),
      l_ref_IxN=jnp.zeros((1, 8)),
      logp_old_IxNxT=jnp.zeros((1,) + scored.shape),
      logp_ref_IxNxT=jnp.zeros((1,) + scored.shape),
      l_ref_Ix2xN=jnp.zeros((1, 2, 8)),
      scored_NxT=jnp.asarray(scored),
    ),
    0,
  )
  likelihood = objectives.estimator_of(ocfg).score(MODEL, params, rows, ocfg)
  logp_KxNxT = diffusion.masked_token_log_probs(
    objectives.log_prob_fn(MODEL),
    params,
    rollout.tokens_NxT,
    rollout.valid_NxT,
    masks,
    CFG.mask_token_id,
  )
  np.testing.assert_array_equal(np.asarray(masks).sum(0), scored)  # each scored token once
  want = np.where(masks[0], logp_KxNxT[0], logp_KxNxT[1])
  np.testing.assert_allclose(likelihood.logp_NxT, np.where(scored, want, 0.0), rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(likelihood.logp_NxT)[scored] < 0)


@pytest.mark.parametrize(
  "variant,inner", [("d1", 8), ("tiny,d1", 8), ("gsm8k,d1", 12), ("tiny", 1)]
)
def test_d1_variant_sets_d1s_settings(variant, inner):
  config = math_config.get_config(variant)
  pcfg = config_lib.posttrain_config(config)
  assert pcfg.num_inner_updates == inner  # d1: 8 on Countdown and Sudoku, 12 on GSM8K and MATH
  if "d1" not in variant:
    assert pcfg.ocfg.loss_aggregation == "sequence" and pcfg.scfg.temperature == 1.0
    return
  ocfg = pcfg.ocfg
  assert (ocfg.clip_eps, ocfg.kl_coef, ocfg.prompt_mask_prob) == (0.5, 0.04, 0.15)
  assert ocfg.loss_aggregation == "group" and not ocfg.score_eos_fill
  assert ocfg.importance_weights  # TraFL under the variant weights its reused samples
  assert pcfg.scfg.temperature == 0.9
  assert (pcfg.optim.weight_decay, pcfg.optim.grad_clip) == (0.1, 0.2)
  if variant.startswith("gsm8k"):
    assert pcfg.optim.lr == 3e-6 and pcfg.group_size == 6
