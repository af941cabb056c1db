"""Gradient accumulation over micro-batches of whole prompt groups: the same prepared likelihoods, loss,
metrics and optimizer step as one pass over the batch, for every objective, also sharded."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from trafl_jax import model as model_lib
from trafl_jax import objectives, rl, sampler, sharding

from .conftest import small_model_config

CFG = small_model_config()
MODEL = model_lib.Transformer(CFG)
PROMPT, COMPLETION = 5, 8
STEPS = 4  # the trajectory case's sampler steps (the batch's commit steps are drawn in 0..STEPS-1)
ROLLOUT = sampler.SamplerConfig(COMPLETION, STEPS, COMPLETION, temperature=1.0, remasking="random")

CASES = {
  "trafl_mlp": dict(objective="trafl", log_z="mlp"),
  "trafl_batch_mean": dict(objective="trafl", log_z="batch_mean", importance_weights=True),
  "trafl_product": dict(objective="trafl", residual="product", num_masks=4),
  "diffu_grpo": dict(objective="diffu_grpo"),
  # The batch's token mean: each micro-batch divides by the whole batch's count.
  "diffu_grpo_token": dict(objective="diffu_grpo", loss_aggregation="token"),
  "elbo_grpo": dict(objective="elbo_grpo"),
  "elbo_grpo_token": dict(objective="elbo_grpo", loss_aggregation="token", score_eos_fill=False),
  "wd1": dict(objective="wd1"),
  "trafl_trajectory": dict(objective="trafl", estimator="trajectory", rollout=ROLLOUT),
}


def _batch(prompts: int, group: int, seed: int = 0) -> objectives.Rollout:
  rng = np.random.default_rng(seed)
  n = prompts * group
  prompt = np.repeat(rng.integers(5, 32, (prompts, PROMPT)), group, 0)
  completion = rng.integers(5, 32, (n, COMPLETION))
  for row, eos_at in enumerate(rng.integers(3, COMPLETION + 1, n)):
    completion[row, eos_at:] = CFG.eos_token_id  # completions of different lengths
  valid = np.ones((n, PROMPT + COMPLETION), bool)
  valid[::2, 0] = False  # some left padding
  is_completion = np.zeros_like(valid)
  is_completion[:, PROMPT:] = True
  return objectives.Rollout(
    tokens_NxT=np.concatenate([prompt, completion], 1).astype(np.int32),
    valid_NxT=valid,
    prompt_NxT=valid & ~is_completion,
    completion_NxT=is_completion,
    rewards_N=rng.integers(0, 2, n).astype(np.float32),
    commit_step_NxT=np.where(is_completion, rng.integers(0, STEPS, (n, PROMPT + COMPLETION)), -1),
  )


def _state():
  params = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), bool))
  params = jax.tree.map(lambda x: 3.0 * x, nn.unbox(params["params"]))
  # Plain SGD: the step is proportional to the gradient, so a wrong accumulation shows in the
  # parameters (Adam's first step is ~lr * sign(g) and would hide a scale error).
  state = rl.create_state(params, optax.sgd(0.5), 1e-3, CFG.d_model, seed=3)
  state = state.replace(log_z=rl.set_log_z_bias(state.log_z, 0.7))
  return state, jax.tree.map(lambda x: 0.9 * x, params)


def _run(case: str, micro_batches: int, batch: objectives.Rollout, group: int, inner: int = 2):
  ocfg = objectives.ObjectiveConfig(beta=2.0, micro_batches=micro_batches, **CASES[case])
  prepare = jax.jit(functools.partial(rl.prepare, model=MODEL, ocfg=ocfg, num_inner=inner))
  update = jax.jit(functools.partial(rl.update, model=MODEL, ocfg=ocfg, group_size=group))
  state, ref_params = _state()
  prepared = prepare(state, ref_params, batch)
  new_state, metrics = update(state, batch, prepared, inner - 1)
  return prepared, new_state, metrics


def _assert_close(a, b, rtol=2e-5, atol=2e-6):
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol),
    a,
    b,
  )


def _assert_same_step(params_a, params_b, before):
  """The two steps agree to float summation order: within 1e-4 of the step's largest component."""
  step_a = jax.tree.map(lambda x, y: np.asarray(x) - np.asarray(y), params_a, before)
  step_b = jax.tree.map(lambda x, y: np.asarray(x) - np.asarray(y), params_b, before)
  largest = max(float(np.abs(x).max()) for x in jax.tree.leaves(step_a))
  assert largest > 1e-4  # the step did something: not two unchanged states compared
  _assert_close(step_b, step_a, rtol=1e-4, atol=1e-4 * largest)


# Micro-batch counts per case: every objective with 2, one with 4 (one prompt group each).
MICRO = {"trafl_mlp": (2, 4)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_micro_batches_give_the_step_of_one_pass(case):
  batch = _batch(prompts=4, group=3)
  inner = 2 if case.startswith("elbo_grpo") else 1  # the selected inner iteration's masks are used
  before, _ = _state()
  prepared_1, state_1, metrics_1 = _run(case, 1, batch, group=3, inner=inner)
  assert float(metrics_1["rl/grad_norm"]) > 0
  for m in MICRO.get(case, (2,)):
    prepared_m, state_m, metrics_m = _run(case, m, batch, group=3, inner=inner)
    _assert_close(prepared_m, prepared_1)
    assert metrics_m.keys() == metrics_1.keys()
    _assert_close(metrics_m, metrics_1, rtol=1e-5)
    _assert_same_step(state_m.params, state_1.params, before.params)
    if case == "trafl_mlp":  # the log Z head learns (Adam) from the accumulated gradient too
      _assert_same_step(state_m.log_z, state_1.log_z, before.log_z)


def test_micro_batches_that_split_a_group_or_the_rows_are_an_error():
  batch = _batch(prompts=4, group=3)
  with pytest.raises(ValueError, match="micro_batches = 3 does not divide the batch's 4 prompt"):
    _run("trafl_mlp", 3, batch, group=3)  # 12 rows divide by 3, the 4 groups do not
  with pytest.raises(ValueError, match="micro_batches = 5 does not divide the batch's 12 rows"):
    _run("wd1", 5, batch, group=3)
  with pytest.raises(ValueError, match="micro_batches must be at least 1"):
    objectives.ObjectiveConfig(micro_batches=0)


def test_sharded_micro_batches_match_one_pass():
  """The jitted steps posttrain.py uses, on a (2, 2, 2) mesh: micro-batches stay row-sharded."""
  group = 4
  batch = _batch(prompts=4, group=group, seed=1)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = sharding.DEFAULT_RULES
  tx = optax.sgd(0.5)
  _, shardings = rl.state_shardings(MODEL, tx, 1e-3, 3, mesh, rules)
  results = []
  for m in (1, 2):
    ocfg = objectives.ObjectiveConfig(beta=2.0, micro_batches=m)
    prepare, update, _ = rl.jit_steps(
      MODEL, ocfg, 1, group, shardings, shardings.params, mesh, rules
    )
    state, ref_params = _state()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      state = jax.device_put(dataclasses.replace(state, tx=tx), shardings)
      ref_params = jax.device_put(ref_params, shardings.params)
      global_batch = sharding.global_batch(batch, mesh, rules)
      prepared = prepare(state, ref_params, global_batch)
      state, metrics = update(state, global_batch, prepared, 0)
    assert state.params["wte"].sharding == shardings.params["wte"]
    results.append((jax.device_get(prepared), jax.device_get(state.params), metrics))
  (prepared_1, params_1, metrics_1), (prepared_2, params_2, metrics_2) = results
  _assert_close(prepared_2, prepared_1)
  _assert_same_step(params_2, params_1, _state()[0].params)
  _assert_close(metrics_2, metrics_1, rtol=1e-5)
