"""TraFL and the reward-maximizing baselines, as loss functions of log-likelihoods and rewards.

DESIGN section 2. Every objective shares the sampler, the surrogate `l(y|x)`, rewards and data; what differs
is the loss below and a few config fields.

Dimension legend:
  B: prompts    G: samples per prompt    T: tokens    D: d_model
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

OBJECTIVES = ("trafl", "diffu_grpo", "elbo_grpo", "wd1")
LOG_Z_KINDS = ("mlp", "batch_mean")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  objective: str = "trafl"
  beta: float = 1.0  # TraFL: target p_ref * exp(beta * r)
  length_normalize: bool = False  # divide l by L_y (FlowRL-style; changes the fixed point)
  estimator: str = "pair"  # pair | random_t | one_step
  num_masks: int = 2
  t_min: float = 0.2
  t_max: float = 0.8
  log_z: str = "mlp"  # mlp | batch_mean
  importance_weights: bool = False  # TraFL with num_inner_updates > 1
  importance_clip: float = 0.2
  clip_eps: float = 0.5  # GRPO baselines' PPO clip
  kl_coef: float = 0.04  # GRPO baselines' k3 KL to the reference
  prompt_mask_prob: float = 0.15  # diffu_grpo: prompt tokens masked in the one-step estimator
  micro_batches: int = 1  # prepare / update over this many micro-batches of whole prompt groups

  def __post_init__(self):
    if self.objective not in OBJECTIVES:
      raise ValueError(f"objective {self.objective!r} is not one of {OBJECTIVES}")
    if self.log_z not in LOG_Z_KINDS:
      raise ValueError(f"log_z {self.log_z!r} is not one of {LOG_Z_KINDS}")
    if self.beta <= 0:
      raise ValueError(f"beta must be positive, got {self.beta}")
    if self.micro_batches < 1:
      raise ValueError(f"micro_batches must be at least 1, got {self.micro_batches}")


class LogZHead(nn.Module):
  """`log Z_phi(x)`: an MLP (2 hidden layers of width D, GELU, LayerNorm) on the mean of the final
  hidden states over the prompt positions of a pass whose completion is fully masked."""

  width: int

  @nn.compact
  def __call__(self, hidden_BxTxD: jax.Array, prompt_BxT: jax.Array) -> jax.Array:
    weights_BxT = prompt_BxT.astype(jnp.float32)
    pooled_BxD = (hidden_BxTxD.astype(jnp.float32) * weights_BxT[..., None]).sum(1)
    pooled_BxD = pooled_BxD / jnp.maximum(weights_BxT.sum(1, keepdims=True), 1.0)
    h = pooled_BxD
    for i in range(2):
      h = nn.Dense(self.width, name=f"hidden_{i}")(h)
      h = nn.LayerNorm(name=f"norm_{i}")(nn.gelu(h))
    return nn.Dense(1, kernel_init=nn.initializers.zeros, name="out")(h)[:, 0]


def trafl_residual(log_z_B, l_theta_BxG, l_ref_BxG, rewards_BxG, beta):
  """`delta_i = log Z(x) + l_theta(y_i) - l_ref(y_i) - beta * r(x, y_i)`."""
  return log_z_B[:, None] + l_theta_BxG - l_ref_BxG - beta * rewards_BxG


def batch_mean_log_z(l_theta_BxG, l_ref_BxG, rewards_BxG, beta):
  """The "no learned Z" ablation: the per-prompt mean that zeroes the mean residual."""
  return jax.lax.stop_gradient(jnp.mean(beta * rewards_BxG - (l_theta_BxG - l_ref_BxG), axis=1))


def importance_weights(l_theta_BxG, l_old_BxG, clip):
  """`stop_grad(clip(exp(l_theta - l_old), 1 - clip, 1 + clip))` for reused rollouts."""
  ratio = jnp.exp(l_theta_BxG - l_old_BxG)
  return jax.lax.stop_gradient(jnp.clip(ratio, 1.0 - clip, 1.0 + clip))


def trafl_loss(log_z_B, l_theta_BxG, l_ref_BxG, rewards_BxG, beta, weights_BxG=None):
  delta_BxG = trafl_residual(log_z_B, l_theta_BxG, l_ref_BxG, rewards_BxG, beta)
  w_BxG = jnp.ones_like(delta_BxG) if weights_BxG is None else weights_BxG
  loss = jnp.mean(w_BxG * delta_BxG**2)
  metrics = {
    "trafl/delta_mean": delta_BxG.mean(),
    "trafl/delta_std": delta_BxG.std(),
    "trafl/log_z_mean": log_z_B.mean(),
    "trafl/log_z_min": log_z_B.min(),
    "trafl/log_z_max": log_z_B.max(),
  }
  return loss, metrics


def group_advantages(rewards_BxG):
  """`A = r - mean_group(r)` (d1's diffu-GRPO does not divide by the group's spread)."""
  return rewards_BxG - rewards_BxG.mean(axis=1, keepdims=True)


def k3(log_ratio_ref_over_theta):
  """The k3 KL estimator `exp(x) - x - 1` with `x = log pi_ref - log pi_theta` (non-negative)."""
  x = log_ratio_ref_over_theta
  return jnp.exp(x) - x - 1.0


def _clipped_surrogate(log_ratio, advantage, eps):
  ratio = jnp.exp(log_ratio)
  return jnp.minimum(ratio * advantage, jnp.clip(ratio, 1.0 - eps, 1.0 + eps) * advantage)


def diffu_grpo_loss(
  logp_theta_NxT, logp_old_NxT, logp_ref_NxT, tokens_NxT, advantage_N, eps, kl_coef
):
  """d1's token-level loss: PPO clip on per-token ratios of the one-step estimator plus k3 KL to the
  reference, averaged over each sequence's scored tokens, then over sequences."""
  surrogate = _clipped_surrogate(logp_theta_NxT - logp_old_NxT, advantage_N[:, None], eps)
  kl = k3(logp_ref_NxT - logp_theta_NxT)
  per_token = -(surrogate - kl_coef * kl)
  count_N = jnp.maximum(tokens_NxT.sum(-1), 1)
  loss = jnp.mean(jnp.where(tokens_NxT, per_token, 0.0).sum(-1) / count_N)
  kl_mean = jnp.mean(jnp.where(tokens_NxT, kl, 0.0).sum(-1) / count_N)
  return loss, {"grpo/kl": kl_mean}


def elbo_grpo_loss(l_theta_N, l_old_N, l_ref_N, length_N, advantage_N, eps, kl_coef):
  """The same advantage and clip on TraFL's sequence-level surrogate. The KL term uses the per-token
  mean of `l_ref - l_theta` so its scale matches diffu_grpo's (a sequence-level exp would overflow)."""
  surrogate = _clipped_surrogate(l_theta_N - l_old_N, advantage_N, eps)
  kl = k3((l_ref_N - l_theta_N) / jnp.maximum(length_N, 1.0))
  return jnp.mean(-(surrogate - kl_coef * kl)), {"grpo/kl": kl.mean()}


def wd1_loss(l_theta_BxG, advantage_BxG):
  """wd1: likelihood weighted by `softmax(A)` over the group, minus weighted by `softmax(-A)`; no ratio."""
  w_pos = jax.lax.stop_gradient(jax.nn.softmax(advantage_BxG, axis=1))
  w_neg = jax.lax.stop_gradient(jax.nn.softmax(-advantage_BxG, axis=1))
  return jnp.mean(jnp.sum((w_neg - w_pos) * l_theta_BxG, axis=1)), {}
