"""Post-training state and jitted steps, shared by TraFL and the baselines.

One outer step: sample G completions per prompt (sampler) -> rewards on the host -> `prepare` draws the masks
for every inner update and computes the old policy's and the reference's likelihoods under them (shared masks,
no gradients) -> `update` once per inner iteration. The objective is a loss function (objectives.py) chosen by
`ObjectiveConfig.objective`; everything else is common.

A rollout batch holds `tokens` (int32 [N, T]: left-padded prompt, then the sampled completion), `valid`
(False on prompt padding), `prompt`, `completion` (bool [N, T]) and `rewards` (float32 [N]); the G samples of
a prompt are consecutive rows.

Dimension legend:
  B: prompts    G: samples per prompt    N: B*G rows    T: prompt + completion tokens
  I: inner updates    K: masks per sequence    D: d_model    M: micro-batches
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from trafl_jax import diffusion, objectives, sharding
from trafl_jax import model as model_lib
from trafl_jax import state as state_lib


class RLState(struct.PyTreeNode):
  step: jax.Array
  params: Any  # the policy
  log_z: Any  # parameters of the log Z head (own optimizer; never exported with the model)
  opt_state: Any
  log_z_opt_state: Any
  rng: jax.Array
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  log_z_tx: optax.GradientTransformation = struct.field(pytree_node=False)

  def checkpoint_tree(self) -> dict:
    return {
      "step": self.step,
      "opt_state": self.opt_state,
      "log_z": self.log_z,
      "log_z_opt_state": self.log_z_opt_state,
      "rng": self.rng,
    }

  def from_checkpoint_tree(self, params, tree) -> RLState:
    return self.replace(params=params, **tree)


@functools.cache  # one object per rate: states built separately have equal static fields
def log_z_optimizer(lr: float) -> optax.GradientTransformation:
  # A larger learning rate than the policy's and no weight decay (DESIGN section 2).
  return optax.adam(lr)


def init_log_z(rng: jax.Array, d_model: int, seq_len: int):
  head = objectives.LogZHead(width=d_model)
  return head.init(rng, jnp.zeros((1, seq_len, d_model)), jnp.ones((1, seq_len), bool))["params"]


def create_state(
  params, tx: optax.GradientTransformation, log_z_lr: float, d_model: int, seed: int
) -> RLState:
  """A fresh post-training state: the policy `params`, a new log Z head, both optimizers, the RNG key."""
  log_z_tx = log_z_optimizer(log_z_lr)
  log_z = init_log_z(jax.random.PRNGKey(seed + 1), d_model, 8)
  return RLState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    log_z=log_z,
    opt_state=tx.init(params),
    log_z_opt_state=log_z_tx.init(log_z),
    rng=jax.random.PRNGKey(seed),
    tx=tx,
    log_z_tx=log_z_tx,
  )


def state_shardings(model: model_lib.Transformer, tx, log_z_lr: float, seed: int, mesh, rules):
  """`(abstract_state, shardings)` of the post-training state, nothing allocated: the policy and its
  optimizer moments follow the parameters' logical axes; the log Z head, step and key are replicated."""

  def create():
    params = state_lib.init_params(model, jax.random.PRNGKey(0), 8)
    return create_state(params, tx, log_z_lr, model.cfg.d_model, seed)

  boxed = jax.eval_shape(create)
  shardings = sharding.logical_to_shardings(nn.get_partition_spec(boxed), mesh, rules)
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
  )
  return abstract, shardings


def batch_shardings(mesh, rules) -> dict[str, NamedSharding]:
  """Shardings of a rollout batch (module docstring): rows over the data axes."""
  rows_2d, rows_1d = (
    sharding.batch_sharding(mesh, rules, 2),
    sharding.batch_sharding(mesh, rules, 1),
  )
  return {
    "tokens": rows_2d,
    "valid": rows_2d,
    "prompt": rows_2d,
    "completion": rows_2d,
    "rewards": rows_1d,
  }


def prepared_shardings(mesh, rules) -> dict[str, NamedSharding]:
  """Shardings of `prepare`'s output: the row axis N over the data axes, wherever it sits."""
  axes = sharding.batch_axes(rules)

  def rows_at(ndim: int, axis: int) -> NamedSharding:
    spec = [None] * ndim
    spec[axis] = axes
    return NamedSharding(mesh, P(*spec))

  return {
    "masks": rows_at(4, 2),  # I x K x N x T
    "inputs": rows_at(3, 1),  # I x N x T
    "l_old": rows_at(2, 1),  # I x N
    "l_ref": rows_at(2, 1),
    "logp_old": rows_at(3, 1),  # I x N x T
    "logp_ref": rows_at(3, 1),
    "scored": rows_at(2, 0),  # N x T
  }


def jit_steps(model, ocfg, num_inner: int, group_size: int, shardings, ref_shardings, mesh, rules):
  """`(prepare, update, init_log_z_bias)` jitted with explicit in/out shardings (the state donated to
  `update`), so a multi-process run moves no data it does not have to and a lowering with abstract
  inputs (scripts/memory_plan.py) sees exactly the training step."""
  replicated = sharding.replicated(mesh)
  batch, prepared = batch_shardings(mesh, rules), prepared_shardings(mesh, rules)
  prepare_fn = jax.jit(
    functools.partial(prepare, model=model, ocfg=ocfg, num_inner=num_inner),
    in_shardings=(shardings, ref_shardings, batch),
    out_shardings=prepared,
  )
  update_fn = jax.jit(
    functools.partial(update, model=model, ocfg=ocfg, group_size=group_size),
    in_shardings=(shardings, batch, prepared, replicated),
    out_shardings=(shardings, replicated),
    donate_argnums=0,
  )
  bias_fn = jax.jit(
    lambda state, rewards: state.replace(
      log_z=set_log_z_bias(state.log_z, ocfg.beta * jnp.mean(rewards))
    ),
    in_shardings=(shardings, batch["rewards"]),
    out_shardings=shardings,
    donate_argnums=0,
  )
  return prepare_fn, update_fn, bias_fn


def set_log_z_bias(log_z_params, value):
  """The head starts at the first batch's mean beta * r (its output layer is zero-initialized)."""
  out = dict(log_z_params["out"])
  out["bias"] = jnp.full_like(out["bias"], value)
  return {**log_z_params, "out": out}


def _apply_fn(model: model_lib.Transformer):
  return lambda params, tokens, valid: model.apply({"params": params}, tokens, valid)


def _one_step_inputs(rng, batch, prompt_mask_prob: float, mask_id: int):
  """diffu-GRPO's estimator input: every completion token masked, prompt tokens masked at p."""
  masked_prompt = jax.random.uniform(rng, batch["prompt"].shape) < prompt_mask_prob
  masked = batch["completion"] | (masked_prompt & batch["prompt"])
  return diffusion.apply_mask(batch["tokens"], masked, mask_id)


def _likelihoods(model, params, batch, masks_KxNxT, inputs_NxT, scored_NxT, ocfg):
  """`(l_N, token_logp_NxT)`: the surrogate for TraFL / elbo_grpo / wd1, per-token log-probabilities of
  the one-step estimator for diffu_grpo."""
  if ocfg.objective == "diffu_grpo":
    logits = model.apply({"params": params}, inputs_NxT, batch["valid"])
    logp_NxT = diffusion.token_log_probs(logits, batch["tokens"])
    return jnp.where(scored_NxT, logp_NxT, 0.0).sum(-1), logp_NxT
  logp_KxNxT = diffusion.masked_token_log_probs(
    _apply_fn(model), params, batch["tokens"], batch["valid"], masks_KxNxT, model.cfg.mask_token_id
  )
  l_N = diffusion.surrogate_from_log_probs(
    logp_KxNxT, masks_KxNxT, scored_NxT, ocfg.length_normalize
  )
  return l_N, jnp.zeros_like(scored_NxT, jnp.float32)


def _split_rows(x, micro_batches: int, axis: int = 0):
  """`[..., N, ...] -> [M, ..., N / M, ...]`: micro-batch m holds rows `m * N / M` to `(m + 1) * N / M`
  (whole consecutive prompt groups), leading, for a `lax.scan` over them. Each micro-batch's rows
  spread over the batch axes like the batch's: the (small) input is replicated first, so the split is
  a local slice rather than a reshuffle SPMD cannot express."""
  x = nn.with_logical_constraint(x, (None,) * x.ndim)
  n = x.shape[axis]
  split = x.reshape(x.shape[:axis] + (micro_batches, n // micro_batches) + x.shape[axis + 1 :])
  split = jnp.moveaxis(split, axis, 0)
  axes = [None] * split.ndim
  axes[axis + 1] = "batch"
  return nn.with_logical_constraint(split, tuple(axes))


def _merge_rows(x, axis: int = 0):
  """The inverse of `_split_rows` on a scan's stacked (small, per-row) outputs, replicated."""
  x = nn.with_logical_constraint(jnp.moveaxis(x, 0, axis), (None,) * x.ndim)
  return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2 :])


def check_micro_batches(rows: int, micro_batches: int, group_size: int | None = None) -> None:
  """Micro-batches hold whole prompt groups (TraFL's log Z, the batch-mean log Z and the group
  advantages are per group), all of the same size (the loss is then the mean of theirs)."""
  if group_size is not None and rows % group_size:
    raise ValueError(f"{rows} rows are not whole groups of rl.group_size = {group_size}")
  what = (
    f"{rows} rows" if group_size is None else f"{rows // group_size} prompt groups ({rows} rows)"
  )
  if (rows if group_size is None else rows // group_size) % micro_batches:
    raise ValueError(
      f"rl.micro_batches = {micro_batches} does not divide the batch's {what}; micro-batches "
      "hold whole prompt groups, all of one size"
    )


def _micro_batched_likelihoods(model, params, batch, masks_KxNxT, inputs_NxT, scored_NxT, ocfg):
  """`_likelihoods` over `ocfg.micro_batches` consecutive row ranges in turn (a `lax.map`), so only one
  micro-batch's activations are alive at a time; the same values as one pass."""
  m = ocfg.micro_batches
  if m == 1:
    return _likelihoods(model, params, batch, masks_KxNxT, inputs_NxT, scored_NxT, ocfg)
  rows = {
    "tokens": _split_rows(batch["tokens"], m),
    "valid": _split_rows(batch["valid"], m),
    "masks": _split_rows(masks_KxNxT, m, axis=1),
    "inputs": _split_rows(inputs_NxT, m),
    "scored": _split_rows(scored_NxT, m),
  }

  def one(mb):
    return _likelihoods(model, params, mb, mb["masks"], mb["inputs"], mb["scored"], ocfg)

  l_MxN, logp_MxNxT = jax.lax.map(one, rows)
  return _merge_rows(l_MxN), _merge_rows(logp_MxNxT)


def prepare(state: RLState, ref_params, batch, *, model, ocfg, num_inner: int):
  """Draws the masks of every inner update and scores the batch under the old policy and the reference
  with them (no gradients), one inner update at a time and micro-batch by micro-batch when
  `ocfg.micro_batches > 1` (the masks are drawn for the whole batch first, so they do not depend on
  it). Returns a dict of `I`-stacked arrays."""
  check_micro_batches(batch["tokens"].shape[0], ocfg.micro_batches)
  scored_NxT = diffusion.scored_positions(
    batch["completion"], batch["tokens"], model.cfg.eos_token_id
  )
  rng = jax.random.fold_in(state.rng, state.step)

  def one(i):
    key = jax.random.fold_in(rng, i)
    if ocfg.objective == "diffu_grpo":
      masks = jnp.zeros((1,) + scored_NxT.shape, bool)
      inputs = _one_step_inputs(key, batch, ocfg.prompt_mask_prob, model.cfg.mask_token_id)
    else:
      masks = diffusion.surrogate_masks(
        key, scored_NxT, ocfg.estimator, ocfg.num_masks, ocfg.t_min, ocfg.t_max
      )
      inputs = batch["tokens"]
    l_old, logp_old = _micro_batched_likelihoods(
      model, state.params, batch, masks, inputs, scored_NxT, ocfg
    )
    l_ref, logp_ref = _micro_batched_likelihoods(
      model, ref_params, batch, masks, inputs, scored_NxT, ocfg
    )
    return {
      "masks": masks,
      "inputs": inputs,
      "l_old": l_old,
      "l_ref": l_ref,
      "logp_old": logp_old,
      "logp_ref": logp_ref,
    }

  # A loop, not an unrolled list: unrolled, XLA kept every iteration's activations alive at once
  # (diffu_grpo with d1's 12 inner updates: 28 GiB of temporaries a device on v4-32, not 8;
  # docs/scaling.md).
  out = jax.lax.map(one, jnp.arange(num_inner))
  out["scored"] = scored_NxT
  return jax.lax.stop_gradient(out)


def objective_loss(ocfg, terms, rows, group_size: int):
  """`(loss, metrics)` of whole prompt groups, from the policy's `terms` (`l_theta` [N], `logp` [N, T],
  `log_z` [B] for TraFL's learned log Z) and the rows' fixed data (`rewards`, `scored` and the
  prepared `l_old`, `l_ref`, `logp_old`, `logp_ref`). Every objective's loss is a mean over prompts or
  rows, so on equal micro-batches the batch's loss is the mean of theirs."""
  l_theta_N, scored_NxT = terms["l_theta"], rows["scored"]
  n = l_theta_N.shape[0]
  b, g = n // group_size, group_size
  rewards_BxG = rows["rewards"].reshape(b, g)
  l_theta, l_ref = l_theta_N.reshape(b, g), rows["l_ref"].reshape(b, g)
  length_N = scored_NxT.sum(-1).astype(jnp.float32)
  adv_BxG = objectives.group_advantages(rewards_BxG)
  if ocfg.objective == "trafl":
    if ocfg.log_z == "mlp":
      log_z_B = terms["log_z"]
    else:
      log_z_B = objectives.batch_mean_log_z(l_theta, l_ref, rewards_BxG, ocfg.beta)
    weights = None
    if ocfg.importance_weights:
      weights = objectives.importance_weights(
        l_theta, rows["l_old"].reshape(b, g), ocfg.importance_clip
      )
    loss, extra = objectives.trafl_loss(log_z_B, l_theta, l_ref, rewards_BxG, ocfg.beta, weights)
  elif ocfg.objective == "diffu_grpo":
    loss, extra = objectives.diffu_grpo_loss(
      terms["logp"],
      rows["logp_old"],
      rows["logp_ref"],
      scored_NxT,
      adv_BxG.reshape(n),
      ocfg.clip_eps,
      ocfg.kl_coef,
    )
  elif ocfg.objective == "elbo_grpo":
    loss, extra = objectives.elbo_grpo_loss(
      l_theta_N,
      rows["l_old"],
      rows["l_ref"],
      length_N,
      adv_BxG.reshape(n),
      ocfg.clip_eps,
      ocfg.kl_coef,
    )
  else:
    loss, extra = objectives.wd1_loss(l_theta, adv_BxG)
  extra["rl/kl_estimate"] = jnp.mean(l_theta_N - rows["l_ref"])
  return loss, extra


def _constrain_like_params(model, tree):
  """Pins a params-shaped tree (the gradient accumulator) to the parameters' logical shardings, so a
  scan carry cannot end up replicated; a no-op outside a mesh and rules context."""
  boxed = jax.eval_shape(lambda: state_lib.init_params(model, jax.random.PRNGKey(0), 8))
  specs = nn.get_partition_spec(boxed)
  return jax.tree.map(nn.with_logical_constraint, tree, specs)


def update(state: RLState, batch, prepared, i, *, model, ocfg, group_size: int):
  """One optimizer step on inner iteration `i`'s masks. With `ocfg.micro_batches = M > 1` the
  gradient is accumulated over M micro-batches of whole prompt groups (a `lax.scan`; one micro-batch's
  activations alive at a time) before the one step: the same loss, metrics and step as M = 1, up to
  float summation order. Returns the new state and flat metrics."""
  g, m = group_size, ocfg.micro_batches
  n = batch["rewards"].shape[0]
  check_micro_batches(n, m, g)
  sel = jax.tree.map(lambda x: x[i], {k: v for k, v in prepared.items() if k != "scored"})
  rows = {
    **{k: batch[k] for k in ("tokens", "valid", "prompt", "completion", "rewards")},
    **{k: sel[k] for k in ("inputs", "l_old", "l_ref", "logp_old", "logp_ref")},
    "masks": sel["masks"],  # K x N x T: the row axis is 1
    "scored": prepared["scored"],
  }
  head = objectives.LogZHead(width=model.cfg.d_model)
  learned_log_z = ocfg.objective == "trafl" and ocfg.log_z == "mlp"

  def micro_step(params, log_z_params, mb):
    """`((loss, terms), grads)` of one micro-batch (or the whole batch)."""
    hidden_BxTxD = None
    if learned_log_z:
      # log Z(x) reads the prompt only: a pass with the completion fully masked, one row per prompt.
      masked_NxT = diffusion.apply_mask(mb["tokens"], mb["completion"], model.cfg.mask_token_id)
      _, hidden = model.apply(
        {"params": params}, masked_NxT[::g], mb["valid"][::g], return_hidden=True
      )
      hidden_BxTxD = jax.lax.stop_gradient(hidden)

    def loss_fn(params, log_z_params):
      l_theta_N, logp_NxT = _likelihoods(
        model, params, mb, mb["masks"], mb["inputs"], mb["scored"], ocfg
      )
      terms = {"l_theta": l_theta_N, "logp": logp_NxT}
      if learned_log_z:
        terms["log_z"] = head.apply({"params": log_z_params}, hidden_BxTxD, mb["prompt"][::g])
      return objective_loss(ocfg, terms, mb, g)[0], terms

    return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, log_z_params)

  if m == 1:
    (_, terms), (grads, log_z_grads) = micro_step(state.params, state.log_z, rows)
  else:
    micro = {k: _split_rows(v, m, axis=1 if k == "masks" else 0) for k, v in rows.items()}

    def accumulate(carry, mb):
      (_, terms), step_grads = micro_step(state.params, state.log_z, mb)
      carry = jax.tree.map(lambda acc, x: acc + x / m, carry, step_grads)
      return (_constrain_like_params(model, carry[0]), carry[1]), terms

    zeros = jax.tree.map(jnp.zeros_like, (state.params, state.log_z))
    zeros = (_constrain_like_params(model, zeros[0]), zeros[1])
    (grads, log_z_grads), terms = jax.lax.scan(accumulate, zeros, micro)
    terms = jax.tree.map(_merge_rows, terms)
  # The batch's loss and metrics from every row's terms at once (std, min and max are not means).
  loss, metrics = objective_loss(ocfg, jax.lax.stop_gradient(terms), rows, g)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  log_z_updates, log_z_opt_state = state.log_z_tx.update(log_z_grads, state.log_z_opt_state)
  state = state.replace(
    params=optax.apply_updates(state.params, updates),
    opt_state=opt_state,
    log_z=optax.apply_updates(state.log_z, log_z_updates),
    log_z_opt_state=log_z_opt_state,
  )
  rewards_BxG = batch["rewards"].reshape(n // g, g)
  metrics.update(
    {
      "rl/loss": loss,
      "rl/grad_norm": optax.global_norm(grads),
      "rl/reward_mean": rewards_BxG.mean(),
      "rl/all_correct_groups": jnp.mean(jnp.all(rewards_BxG > 0, axis=1)),
      "rl/all_wrong_groups": jnp.mean(jnp.all(rewards_BxG <= 0, axis=1)),
      "rl/completion_length": prepared["scored"].sum(-1).astype(jnp.float32).mean(),
    }
  )
  return state, metrics
