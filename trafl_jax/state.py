"""The train state, the optimizer, and sharded state creation (shardings from `eval_shape`)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct

from trafl_jax import sharding as sharding_lib


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: optax.OptState
  rng: jax.Array  # per-run key; steps use fold_in(rng, step) so a resumed run draws the same masks
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  def checkpoint_tree(self) -> dict:
    """What a checkpoint stores besides the parameters."""
    return {"step": self.step, "opt_state": self.opt_state, "rng": self.rng}

  def checkpoint_params(self):
    return self.params

  def from_checkpoint_tree(self, params, tree) -> TrainState:
    return self.replace(
      params=params, step=tree["step"], opt_state=tree["opt_state"], rng=tree["rng"]
    )

  def apply_gradients(self, grads) -> TrainState:
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float
  schedule: str
  warmup_steps: int
  min_lr_ratio: float
  weight_decay: float
  b1: float
  b2: float
  eps: float
  grad_clip: float
  total_steps: int


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
  warmup = max(cfg.warmup_steps, 0)
  if cfg.schedule == "constant":
    if warmup == 0:
      return optax.constant_schedule(cfg.lr)
    return optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr)], [warmup]
    )
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=cfg.lr,
      warmup_steps=warmup,
      decay_steps=max(cfg.total_steps, warmup + 1),
      end_value=cfg.lr * cfg.min_lr_ratio,
    )
  raise ValueError(f"optim.schedule {cfg.schedule!r} is not 'cosine' or 'constant'")


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  # Norm scales (1-D) are not decayed.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
    optax.clip_by_global_norm(cfg.grad_clip),
    optax.adamw(
      learning_rate=learning_rate_schedule(cfg),
      b1=cfg.b1,
      b2=cfg.b2,
      eps=cfg.eps,
      weight_decay=cfg.weight_decay,
      mask=decay_mask,
    ),
  )


def init_params(model: nn.Module, rng: jax.Array, seq_len: int):
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return model.init(rng, tokens, jnp.ones((1, seq_len), jnp.bool_))["params"]


def abstract_params(model: nn.Module):
  """The model's parameter shapes, boxed with their logical axes, nothing allocated: the one way every
  module builds them (`nn.get_partition_spec` reads the axes, `nn.unbox` drops them)."""
  return jax.eval_shape(functools.partial(init_params, model, jax.random.PRNGKey(0), 8))


def param_target(model: nn.Module, mesh, rules):
  """`(abstract_params, shardings)`: unboxed `ShapeDtypeStruct`s carrying their shardings on `mesh`
  (what a checkpoint is restored into)."""
  boxed = abstract_params(model)
  shardings = sharding_lib.logical_to_shardings(nn.get_partition_spec(boxed), mesh, rules)
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
  )
  return target, shardings


def create_state(model: nn.Module, tx, rng: jax.Array, seq_len: int) -> TrainState:
  init_rng, run_rng = jax.random.split(rng)
  params = init_params(model, init_rng, seq_len)
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=run_rng, tx=tx
  )


def logical_specs(model: nn.Module, tx, seq_len: int):
  """Logical PartitionSpecs of the whole state (optimizer moments follow their parameters)."""
  create = functools.partial(create_state, model, tx, seq_len=seq_len)
  abstract = jax.eval_shape(create, jax.random.PRNGKey(0))
  return nn.get_partition_spec(abstract), abstract


def state_shardings(model: nn.Module, tx, seq_len: int, mesh, rules):
  specs, abstract = logical_specs(model, tx, seq_len)
  shardings = sharding_lib.logical_to_shardings(specs, mesh, rules)
  flat_shardings = jax.tree.leaves(
    shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
  )
  flat_abstract = jax.tree.leaves(abstract)
  for leaf, leaf_sharding in zip(flat_abstract, flat_shardings):
    sharding_lib.check_divisible(leaf.shape, leaf_sharding, f"state leaf of shape {leaf.shape}")
  return shardings, abstract


def create_sharded_state(model, tx, rng, seq_len: int, mesh, rules) -> tuple[TrainState, Any]:
  """Initializes the state directly in its shardings (no full copy on one device)."""
  shardings, _ = state_shardings(model, tx, seq_len, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    create = jax.jit(
      functools.partial(create_state, model, tx, seq_len=seq_len), out_shardings=shardings
    )
    state = create(rng)
  return nn.unbox(state), nn.unbox(shardings)
