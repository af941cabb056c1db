"""Post-training state and jitted steps, shared by TraFL and the baselines.

One outer step: sample G completions per prompt (sampler) -> rewards on the host -> `prepare` draws the masks
for every inner update and computes the old policy's and the reference's likelihoods under them (shared masks,
no gradients) -> `update` once per inner iteration.

What differs between objectives (their loss and the estimator they score with) is in objectives.py's
registries; so are the typed contracts the steps hand each other (`Rollout`, `Prepared`, `Rows`, `Terms`).

Dimension legend:
  B: prompts    G: samples per prompt    N: B*G rows    T: prompt + completion tokens
  I: inner updates    K: masks per sequence    D: d_model    M: micro-batches
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from trafl_jax import diagnostics, diffusion, lora, objectives, sharding
from trafl_jax import model as model_lib
from trafl_jax import state as state_lib


class RLState(struct.PyTreeNode):
  """With adapters in `params` (lora.py) only they are trained: `opt_state` is theirs, checkpoints hold
  them (not the base), and the reference is `params` without them."""

  step: jax.Array
  params: Any  # the policy (the frozen base and its adapters, with lora)
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

  def checkpoint_params(self):
    """What a checkpoint saves of `params`: the trainable part (the adapters alone, with lora)."""
    return lora.split_trainable(self.params)[0]

  def from_checkpoint_tree(self, params, tree) -> RLState:
    _, frozen = lora.split_trainable(self.params)
    return self.replace(params=lora.combine(frozen, params), **tree)


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
    opt_state=tx.init(lora.split_trainable(params)[0]),
    log_z_opt_state=log_z_tx.init(log_z),
    rng=jax.random.PRNGKey(seed),
    tx=tx,
    log_z_tx=log_z_tx,
  )


def state_shardings(model: model_lib.Transformer, tx, log_z_lr: float, seed: int, mesh, rules):
  """`(abstract_state, shardings)` of the post-training state, nothing allocated: the policy and its
  optimizer moments follow the parameters' logical axes; the log Z head, step and key are replicated."""
  create = functools.partial(
    create_state, tx=tx, log_z_lr=log_z_lr, d_model=model.cfg.d_model, seed=seed
  )
  boxed = jax.eval_shape(create, state_lib.abstract_params(model))
  shardings = sharding.logical_to_shardings(nn.get_partition_spec(boxed), mesh, rules)
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
  )
  return abstract, shardings


# ----------------------------------------------------------------------------------------------
# Shardings and jitting


def rollout_shardings(mesh, rules) -> objectives.Rollout:
  """Shardings of a rollout batch: rows over the data axes."""
  rows_2d = sharding.batch_sharding(mesh, rules, 2)
  return objectives.Rollout(
    tokens_NxT=rows_2d,
    valid_NxT=rows_2d,
    prompt_NxT=rows_2d,
    completion_NxT=rows_2d,
    rewards_N=sharding.batch_sharding(mesh, rules, 1),
    commit_step_NxT=rows_2d,
  )


def prepared_shardings(mesh, rules) -> objectives.Prepared:
  """Shardings of `prepare`'s output: the row axis N over the data axes, wherever it sits."""
  axes = sharding.batch_axes(rules)

  def sharded(name: str) -> NamedSharding:
    dims = name.rsplit("_", 1)[1].split("x")
    spec = [None] * len(dims)
    spec[dims.index("N")] = axes
    return NamedSharding(mesh, P(*spec))

  return objectives.Prepared(
    **{f.name: sharded(f.name) for f in dataclasses.fields(objectives.Prepared)}
  )


def jit_steps(model, ocfg, num_inner: int, group_size: int, shardings, ref_shardings, mesh, rules):
  """`(prepare, update, init_log_z_bias)` jitted with explicit in/out shardings (the state donated to
  `update`), so a multi-process run moves no data it does not have to and a lowering with abstract
  inputs (scripts/memory_plan.py) sees exactly the training step."""
  replicated = sharding.replicated(mesh)
  rollout, prepared = rollout_shardings(mesh, rules), prepared_shardings(mesh, rules)
  prepare_fn = jax.jit(
    functools.partial(prepare, model=model, ocfg=ocfg, num_inner=num_inner),
    in_shardings=(shardings, ref_shardings, rollout),
    out_shardings=prepared,
  )
  update_fn = jax.jit(
    functools.partial(update, model=model, ocfg=ocfg, group_size=group_size),
    in_shardings=(shardings, rollout, prepared, replicated),
    out_shardings=(shardings, replicated),
    donate_argnums=0,
  )
  bias_fn = jax.jit(
    lambda state, rewards_N: state.replace(
      log_z=set_log_z_bias(state.log_z, objectives.log_z_of(jnp.mean(rewards_N), ocfg.beta))
    ),
    in_shardings=(shardings, rollout.rewards_N),
    out_shardings=shardings,
    donate_argnums=0,
  )
  return prepare_fn, update_fn, bias_fn


def set_log_z_bias(log_z_params, value):
  """The head starts at the log Z of the first batch's success rate (`log_z_of`; its output layer is
  zero-initialized, so the bias is its output)."""
  out = dict(log_z_params["out"])
  out["bias"] = jnp.full_like(out["bias"], value)
  return {**log_z_params, "out": out}


# ----------------------------------------------------------------------------------------------
# Micro-batches


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


def merge_micro_batches(node):
  """The inverse of `split_micro_batches` on a scan's stacked (small, per-row) outputs: every field's
  leading M axis merged back into its row axis, read from its name."""
  return node.replace(
    **{
      f.name: _merge_rows(getattr(node, f.name), objectives._row_axis(f.name))
      for f in dataclasses.fields(node)
    }
  )


def split_micro_batches(node, micro_batches: int):
  """A PyTreeNode of row-indexed fields -> the same node with a leading M axis on every field (each
  field split on its own N axis, read from its name)."""
  return node.replace(
    **{
      f.name: _split_rows(getattr(node, f.name), micro_batches, objectives._row_axis(f.name))
      for f in dataclasses.fields(node)
      if getattr(node, f.name) is not None
    }
  )


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


def _likelihoods(model, params, rows: objectives.Rows, ocfg) -> objectives.Likelihood:
  """The objective's estimator's likelihoods of `params`, over `ocfg.micro_batches` consecutive row
  ranges in turn (a `lax.map`) when it is above 1, so only one micro-batch's activations are alive at a
  time; the same values as one pass."""
  score = functools.partial(objectives.estimator_of(ocfg).score, model, params, ocfg=ocfg)
  if ocfg.micro_batches == 1:
    return score(rows)
  return merge_micro_batches(jax.lax.map(score, split_micro_batches(rows, ocfg.micro_batches)))


# ----------------------------------------------------------------------------------------------
# The steps


def prepare(
  state: RLState, ref_params, rollout: objectives.Rollout, *, model, ocfg, num_inner: int
):
  """Draws the masks of every inner update and scores the batch under the old policy and the reference
  with them (no gradients), one inner update at a time and micro-batch by micro-batch when
  `ocfg.micro_batches > 1` (the masks are drawn for the whole batch first, so they do not depend on
  it). `ref_params` None: the reference is the policy's base, adapters off (lora)."""
  check_micro_batches(rollout.tokens_NxT.shape[0], ocfg.micro_batches)
  reference = lora.base_of(state.params) if ref_params is None else ref_params
  scored_NxT = rollout.completion_NxT
  if not ocfg.score_eos_fill:  # the answer up to its first EOS; the fill after it stays visible
    scored_NxT = diffusion.scored_positions(scored_NxT, rollout.tokens_NxT, model.cfg.eos_token_id)
  rng = jax.random.fold_in(state.rng, state.step)
  estimator = objectives.estimator_of(ocfg)

  def one(i):
    key = jax.random.fold_in(rng, i)
    masks, inputs = estimator.draw(key, rollout, scored_NxT, ocfg, model.cfg.mask_token_id)
    # What scoring reads; the fields it does not are left out (None), so micro-batches skip them.
    rows = objectives.Rows(
      tokens_NxT=rollout.tokens_NxT,
      valid_NxT=rollout.valid_NxT,
      prompt_NxT=None,
      completion_NxT=None,
      rewards_N=None,
      masks_KxNxT=masks,
      inputs_NxT=inputs,
      l_old_N=None,
      l_ref_N=None,
      logp_old_NxT=None,
      logp_ref_NxT=None,
      l_ref_2xN=None,
      scored_NxT=scored_NxT,
      commit_step_NxT=rollout.commit_step_NxT,
      tokens_per_row_N=None,
    )
    old = _likelihoods(model, state.params, rows, ocfg)
    ref = _likelihoods(model, reference, rows, ocfg)
    return objectives.Prepared(
      masks_IxKxNxT=masks,
      inputs_IxNxT=inputs,
      l_old_IxN=old.l_N,
      l_ref_IxN=ref.l_N,
      logp_old_IxNxT=old.logp_NxT,
      logp_ref_IxNxT=ref.logp_NxT,
      l_ref_Ix2xN=ref.l_2xN,
      scored_NxT=None,
    )

  # A loop, not an unrolled list: unrolled, XLA kept every iteration's activations alive at once
  # (diffu_grpo with d1's 12 inner updates: 28 GiB of temporaries a device on v4-32, not 8;
  # docs/scaling.md).
  stacked = jax.lax.map(one, jnp.arange(num_inner))  # one update's fields, stacked on I
  return jax.lax.stop_gradient(stacked.replace(scored_NxT=scored_NxT))


def _constrain_like_params(model, tree):
  """Pins a tree shaped like the trainable parameters (the gradient accumulator) to their logical
  shardings, so a scan carry cannot end up replicated; a no-op outside a mesh and rules context."""
  specs = nn.get_partition_spec(state_lib.abstract_params(model))
  if lora.has_adapters(tree):
    specs = lora.adapters_of(specs)
  return jax.tree.map(nn.with_logical_constraint, tree, specs)


def _accumulated(micro_step, trainable, log_z, rows: objectives.Rows, m: int, model):
  """`(terms, (grads, log_z_grads))` of the whole batch: one `micro_step` when `m` is 1, else the mean
  of its gradients over `m` micro-batches (a `lax.scan`; one micro-batch's activations alive at a
  time), the terms merged back into row order."""
  if m == 1:
    (_, terms), grads = micro_step(trainable, log_z, rows)
    return terms, grads

  def accumulate(carry, mb):
    (_, terms), step_grads = micro_step(trainable, log_z, mb)
    carry = jax.tree.map(lambda acc, x: acc + x / m, carry, step_grads)
    return (_constrain_like_params(model, carry[0]), carry[1]), terms

  zeros = jax.tree.map(jnp.zeros_like, (trainable, log_z))
  zeros = (_constrain_like_params(model, zeros[0]), zeros[1])
  grads, terms = jax.lax.scan(accumulate, zeros, split_micro_batches(rows, m))
  return merge_micro_batches(terms), grads


def update(
  state: RLState,
  rollout: objectives.Rollout,
  prepared: objectives.Prepared,
  i,
  *,
  model,
  ocfg,
  group_size: int,
):
  """One optimizer step on inner iteration `i`'s masks. With `ocfg.micro_batches = M > 1` the
  gradient is accumulated over M micro-batches of whole prompt groups (a `lax.scan`; one micro-batch's
  activations alive at a time) before the one step: the same loss, metrics and step as M = 1, up to
  float summation order. Returns the new state and flat metrics."""
  g, m = group_size, ocfg.micro_batches
  n = rollout.rewards_N.shape[0]
  check_micro_batches(n, m, g)
  rows = objectives.Rows.of(rollout, prepared, i)
  head = objectives.LogZHead(width=model.cfg.d_model)
  score = objectives.estimator_of(ocfg).score
  # Gradients and optimizer steps for the trainable part only (with lora: the adapters, not the base).
  trainable, frozen = lora.split_trainable(state.params)

  def micro_step(trainable, log_z_params, mb: objectives.Rows):
    """`((loss, terms), grads)` of one micro-batch (or the whole batch), w.r.t. `trainable`."""
    params = lora.combine(frozen, trainable)
    hidden_BxTxD = None
    if objectives.learned_log_z(ocfg):
      # log Z(x) reads the prompt only: a pass with the completion fully masked, one row per prompt.
      masked_NxT = diffusion.apply_mask(mb.tokens_NxT, mb.completion_NxT, model.cfg.mask_token_id)
      _, hidden = model.apply(
        {"params": params}, masked_NxT[::g], mb.valid_NxT[::g], return_hidden=True
      )
      hidden_BxTxD = jax.lax.stop_gradient(hidden)

    def loss_fn(trainable, log_z_params):
      likelihood = score(model, lora.combine(frozen, trainable), mb, ocfg)
      log_z_B = jnp.zeros((0,))
      if objectives.learned_log_z(ocfg):
        log_z_B = head.apply({"params": log_z_params}, hidden_BxTxD, mb.prompt_NxT[::g])
      terms = objectives.Terms(
        l_theta_N=likelihood.l_N,
        logp_NxT=likelihood.logp_NxT,
        log_z_B=log_z_B,
        l_theta_2xN=likelihood.l_2xN,
      )
      return objectives.objective_loss(ocfg, terms, mb, g)[0], terms

    return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(trainable, log_z_params)

  terms, (grads, log_z_grads) = _accumulated(micro_step, trainable, state.log_z, rows, m, model)
  # The batch's loss and metrics from every row's terms at once (std, min and max are not means).
  terms = jax.lax.stop_gradient(terms)
  loss, metrics = objectives.objective_loss(ocfg, terms, rows, g)
  updates, opt_state = state.tx.update(grads, state.opt_state, trainable)
  log_z_updates, log_z_opt_state = state.log_z_tx.update(log_z_grads, state.log_z_opt_state)
  state = state.replace(
    params=lora.combine(frozen, optax.apply_updates(trainable, updates)),
    opt_state=opt_state,
    log_z=optax.apply_updates(state.log_z, log_z_updates),
    log_z_opt_state=log_z_opt_state,
  )
  rewards_BxG = objectives._grouped(rollout.rewards_N, g)
  # The answer's length, up to and including its first EOS.
  length_N = diffusion.scored_positions(
    rollout.completion_NxT, rollout.tokens_NxT, model.cfg.eos_token_id
  ).sum(-1)
  length_N = length_N.astype(jnp.float32)
  metrics.update(
    {
      "rl/loss": loss,
      "rl/grad_norm": optax.global_norm(grads),
      "rl/reward_mean": rewards_BxG.mean(),
      "rl/all_correct_groups": jnp.mean(jnp.all(rewards_BxG > 0, axis=1)),
      "rl/all_wrong_groups": jnp.mean(jnp.all(rewards_BxG <= 0, axis=1)),
      "rl/completion_length": length_N.mean(),
    }
  )
  metrics.update(diagnostics.step_metrics(ocfg, terms, rows, g, length_N))
  return state, metrics
