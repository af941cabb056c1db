"""TraFL and the reward-maximizing baselines: their losses, the estimators they score sequences with,
and the typed data the post-training steps (rl.py) hand each other.

DESIGN section 2. Every objective shares the sampler, the surrogate `l(y|x)`, rewards and data; what differs
is two registry entries: the objective's loss (`OBJECTIVES`: a function of the policy's `Terms` and the
rows' fixed data, over the loss functions below) and the estimator it scores sequences with (`ESTIMATORS`:
how inputs are masked and what likelihood comes out). A new objective or estimator is one function and one
entry. The data are `struct.PyTreeNode`s with their shapes in their field names: a `Rollout` (the G
samples of a prompt are consecutive rows), `Prepared` (rl.prepare's output, stacked over the inner
updates), `Rows` (one inner update's view of both) and `Terms` (the policy's likelihoods).

Estimators: `sequence` (the masked-diffusion surrogate over K masks: `estimator` pair | random_t |
one_step), `token` (diffu-GRPO's one-step per-token log-probabilities) and `trajectory` (`estimator =
"trajectory"`, for the sequence-level objectives: the exact log-probability of the rollout's recorded
denoising path, one pass per sampler step; needs random remasking, see `trajectory_log_probs`).

Dimension legend:
  B: prompts    G: samples per prompt    N: B*G rows    T: tokens    D: d_model
  I: inner updates    K: masks per sequence    L: completion    V: vocabulary    S: sampler steps
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from trafl_jax import diffusion, sampler

LOG_Z_KINDS = ("mlp", "batch_mean", "centred")
RESIDUALS = ("square", "product")
AGGREGATIONS = ("sequence", "token", "group")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  objective: str = "trafl"
  beta: float = 1.0  # TraFL: target p_ref * exp(beta * r)
  length_normalize: bool = False  # divide l by L_y (FlowRL-style; changes the fixed point)
  # The EOS fill after the answer is masked and scored with it, so `l` includes the answer's length (as
  # the reference's SFT loss does); False scores up to the first EOS, the fill always visible.
  score_eos_fill: bool = True
  # pair | random_t | one_step: the surrogate's masks; trajectory: the exact path (trajectory_log_probs)
  estimator: str = "pair"
  num_masks: int = 2
  t_min: float = 0.2
  t_max: float = 0.8
  # mlp | batch_mean | centred (the head is learned, the policy's residual centred per group)
  log_z: str = "mlp"
  # The policy's residual reads log Z clipped to [0, beta], where log Z(x) lies for rewards in [0, 1]
  # (mlp: the head's output, the head learning unclipped; batch_mean: the group mean). Unbounded, log Z
  # can follow a collapsing policy down (bounded_log_z).
  log_z_bounded: bool = False
  # TraFL's loss: "square" = mean(w delta^2) with the surrogate over all masks; "product" = mean(w delta_A
  # delta_B) over two independent halves of the masks, unbiased for the square of the exact residual
  # (E[delta^2] adds the masks' variance: a pull toward the reference).
  residual: str = "square"
  importance_weights: bool = False  # TraFL with num_inner_updates > 1
  importance_clip: float = 0.2
  clip_eps: float = 0.5  # GRPO baselines' PPO clip
  kl_coef: float = 0.04  # GRPO baselines' k3 KL to the reference
  # How the GRPO baselines average per-token terms (diffu_grpo's loss, elbo_grpo's KL): "sequence" =
  # each row's mean over its scored tokens, then the mean over rows; "token" = every scored token of the
  # batch weighs the same (sum / the batch's count, exact under micro-batches); "group" = the token mean
  # of each prompt group, then the mean over groups (what d1 computes: its TRL micro-batch is one group).
  loss_aggregation: str = "sequence"
  prompt_mask_prob: float = 0.15  # diffu_grpo: prompt tokens masked in the one-step estimator
  micro_batches: int = 1  # prepare / update over this many micro-batches of whole prompt groups
  # The sampler the rollouts came from (config_lib: the rl section's sampler keys): the trajectory
  # estimator scores its paths with its logits and temperature. None where nothing reads it.
  rollout: sampler.SamplerConfig | None = None

  def __post_init__(self):
    if self.objective not in OBJECTIVES:
      raise ValueError(f"objective {self.objective!r} is not one of {tuple(OBJECTIVES)}")
    if self.log_z not in LOG_Z_KINDS:
      raise ValueError(f"log_z {self.log_z!r} is not one of {LOG_Z_KINDS}")
    if self.beta <= 0:
      raise ValueError(f"beta must be positive, got {self.beta}")
    if self.residual not in RESIDUALS:
      raise ValueError(f"residual {self.residual!r} is not one of {RESIDUALS}")
    if self.log_z_bounded and self.log_z == "centred":
      raise ValueError(
        "log_z_bounded bounds the log Z the policy's residual reads; log_z 'centred' removes it "
        "(the residual is centred per group): use mlp or batch_mean"
      )
    if self.estimator == "trajectory":
      check_trajectory(self)
    if self.loss_aggregation not in AGGREGATIONS:
      raise ValueError(f"loss_aggregation {self.loss_aggregation!r} is not one of {AGGREGATIONS}")
    if self.residual == "product":
      if self.objective != "trafl":
        raise ValueError("residual 'product' is TraFL's; the other objectives have no residual")
      diffusion.independent_halves(self.estimator, self.num_masks)  # names what does not split
    if self.micro_batches < 1:
      raise ValueError(f"micro_batches must be at least 1, got {self.micro_batches}")


def check_trajectory(ocfg: ObjectiveConfig) -> None:
  """The settings the exact trajectory estimator needs, each named when it is missing."""
  if OBJECTIVES[ocfg.objective].estimator != "sequence":
    raise ValueError(
      f"estimator 'trajectory' replaces the sequence-level surrogate (trafl, elbo_grpo, wd1); "
      f"{ocfg.objective} scores with its own one-step token estimator"
    )
  if ocfg.rollout is None:
    raise ValueError(
      "estimator 'trajectory' scores the rollouts' paths: give the sampler (rollout)"
    )
  if ocfg.rollout.remasking not in ("random", "origin"):
    raise ValueError(
      f"estimator 'trajectory' needs remasking 'random' or 'origin' (got "
      f"{ocfg.rollout.remasking!r}): only when "
      "the order of the commits does not depend on the model does its probability cancel in "
      "p_theta / p_ref"
    )
  if ocfg.rollout.temperature <= 0:
    raise ValueError(
      "estimator 'trajectory' needs temperature > 0: a greedy rollout has no path probability"
    )
  if not ocfg.rollout.exact:
    raise ValueError(
      f"estimator 'trajectory' replays the exact sampler's steps; the rollouts' sampler is "
      f"{ocfg.rollout.mode!r} (set rl.rollout to cache none, threshold 0, stop_at_eos False)"
    )
  if ocfg.residual == "product":
    raise ValueError(
      "estimator 'trajectory' is exact, so the residual has no mask noise: use residual 'square' "
      "(the product of two draws of it is the same square)"
    )
  if not ocfg.score_eos_fill:
    raise ValueError(
      "estimator 'trajectory' scores the whole path, the EOS fill included: score_eos_fill must be True"
    )


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


def log_z_of(p, beta):
  """The tilted target's `log Z = log E_ref[exp(beta r)] = log(1 + (e^beta - 1) p)` for a 0/1 reward
  with success rate p under the reference: between 0 (p = 0) and beta (p = 1)."""
  return jnp.log1p(jnp.expm1(beta) * p)


def bounded_log_z(log_z_B, ocfg):
  """The log Z the policy's residual reads: with `log_z_bounded`, clipped to [0, beta] (where log Z
  lies for rewards in [0, 1]) and held fixed. The bound is the anchor the residual lacks on-policy: with
  log Z free, a policy collapsed onto a few completions S has zero loss at `Z = sum_S p_ref e^{beta r}`
  (tiny), and a head (or group mean) fit to the same samples follows it down; with `log Z >= 0` what it
  samples must carry the reference's mass, and a sharpened policy (`l_theta - l_ref > 0` on everything
  it samples) is pushed back. The head itself still learns from its own residual, unclipped."""
  if not ocfg.log_z_bounded:
    return log_z_B
  return jax.lax.stop_gradient(jnp.clip(log_z_B, 0.0, ocfg.beta))


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


def trafl_product_loss(log_z_B, l_theta_2xBxG, l_ref_2xBxG, rewards_BxG, beta, weights_BxG=None):
  """`mean(w delta_A delta_B)`: the residuals of two independent mask draws A and B. Their product's
  expectation is the square of the exact residual (`E[delta_A] E[delta_B] = delta_S^2`), where
  `E[delta^2] = delta_S^2 + Var_M(l_theta - l_ref)` also minimizes the mask noise."""
  delta_A = trafl_residual(log_z_B, l_theta_2xBxG[0], l_ref_2xBxG[0], rewards_BxG, beta)
  delta_B = trafl_residual(log_z_B, l_theta_2xBxG[1], l_ref_2xBxG[1], rewards_BxG, beta)
  w_BxG = jnp.ones_like(delta_A) if weights_BxG is None else weights_BxG
  product = delta_A * delta_B
  return jnp.mean(w_BxG * product), {
    "trafl/residual_product": product.mean(),
    "trafl/mask_noise": jnp.mean(0.5 * (delta_A - delta_B) ** 2),  # E: Var_M of one draw's delta
  }


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


def clip_active(log_ratio, advantage, eps):
  """Where the PPO clip takes the gradient away: the ratio is past `1 +- eps` in the advantage's
  direction (A > 0 and ratio > 1 + eps, or A < 0 and ratio < 1 - eps)."""
  ratio = jnp.exp(log_ratio)
  return ((advantage > 0) & (ratio > 1.0 + eps)) | ((advantage < 0) & (ratio < 1.0 - eps))


def token_mean(values_NxT, scored_NxT, how: str, group_size: int = 1, tokens_per_row_N=None):
  """The mean of per-token values over the scored tokens (`AGGREGATIONS`). "token" divides the rows'
  sum by `N * tokens_per_row` (the whole batch's scored tokens per row, the same on every row), so a
  micro-batch's value is its share of the batch's token mean and the mean over equal micro-batches is
  exactly the batch's; without it, the rows' own count."""
  sums_N = jnp.where(scored_NxT, values_NxT, 0.0).sum(-1)
  count_N = scored_NxT.sum(-1).astype(jnp.float32)
  if how == "sequence":
    return jnp.mean(sums_N / jnp.maximum(count_N, 1.0))
  if how == "group":
    sums_B, count_B = _grouped(sums_N, group_size).sum(1), _grouped(count_N, group_size).sum(1)
    return jnp.mean(sums_B / jnp.maximum(count_B, 1.0))
  if how != "token":
    raise ValueError(f"aggregation {how!r} is not one of {AGGREGATIONS}")
  per_row = count_N.mean() if tokens_per_row_N is None else tokens_per_row_N.mean()
  denominator = sums_N.shape[0] * per_row
  return jnp.where(denominator > 0, sums_N.sum() / jnp.maximum(denominator, 1e-6), 0.0)


def diffu_grpo_loss(
  logp_theta_NxT,
  logp_old_NxT,
  logp_ref_NxT,
  tokens_NxT,
  advantage_N,
  eps,
  kl_coef,
  aggregation: str = "sequence",
  group_size: int = 1,
  tokens_per_row_N=None,
):
  """d1's token-level loss: PPO clip on per-token ratios of the one-step estimator plus k3 KL to the
  reference of the same masked input, per token, averaged over the scored tokens by `aggregation`
  (`token_mean`; d1: "group")."""
  log_ratio_NxT = logp_theta_NxT - logp_old_NxT
  surrogate = _clipped_surrogate(log_ratio_NxT, advantage_N[:, None], eps)
  kl = k3(logp_ref_NxT - logp_theta_NxT)
  per_token = -(surrogate - kl_coef * kl)
  mean = functools.partial(
    token_mean,
    scored_NxT=tokens_NxT,
    how=aggregation,
    group_size=group_size,
    tokens_per_row_N=tokens_per_row_N,
  )
  clipped = clip_active(log_ratio_NxT, advantage_N[:, None], eps)
  ratio = jnp.exp(jax.lax.stop_gradient(log_ratio_NxT))
  return mean(per_token), {
    "grpo/kl": mean(kl),
    "grpo/clip_fraction": mean(clipped.astype(jnp.float32)),
    "grpo/ratio_mean": mean(ratio),
  }


def elbo_grpo_loss(
  l_theta_N,
  l_old_N,
  l_ref_N,
  logp_theta_NxT,
  logp_ref_NxT,
  scored_NxT,
  advantage_N,
  eps,
  kl_coef,
  aggregation: str = "sequence",
  group_size: int = 1,
  tokens_per_row_N=None,
):
  """The same advantage and clip on TraFL's sequence-level surrogate (mean over rows), and d1's KL: k3
  per token of the log-probabilities the policy and the reference give each scored token in the same
  masked copies (`_score_masked_copies`: the mean over the copies that mask it; with the pair's two
  coupled masks, one copy, so exactly d1's per-token form), averaged like diffu_grpo's."""
  log_ratio_N = l_theta_N - l_old_N
  surrogate = _clipped_surrogate(log_ratio_N, advantage_N, eps)
  kl = token_mean(
    k3(logp_ref_NxT - logp_theta_NxT), scored_NxT, aggregation, group_size, tokens_per_row_N
  )
  return jnp.mean(-surrogate) + kl_coef * kl, {
    "grpo/kl": kl,
    "grpo/clip_fraction": jnp.mean(clip_active(log_ratio_N, advantage_N, eps)),
    "grpo/ratio_mean": jnp.mean(jnp.exp(jax.lax.stop_gradient(log_ratio_N))),
  }


def wd1_loss(l_theta_BxG, advantage_BxG):
  """wd1: likelihood weighted by `softmax(A)` over the group, minus weighted by `softmax(-A)`; no ratio."""
  w_pos = jax.lax.stop_gradient(jax.nn.softmax(advantage_BxG, axis=1))
  w_neg = jax.lax.stop_gradient(jax.nn.softmax(-advantage_BxG, axis=1))
  return jnp.mean(jnp.sum((w_neg - w_pos) * l_theta_BxG, axis=1)), {}


# ----------------------------------------------------------------------------------------------
# What the jitted steps hand each other (rl.py), and the two registries


class Rollout(struct.PyTreeNode):
  """A rollout batch: left-padded prompts followed by the sampled completions."""

  tokens_NxT: jax.Array  # int32
  valid_NxT: jax.Array  # False on prompt padding
  prompt_NxT: jax.Array
  completion_NxT: jax.Array
  rewards_N: jax.Array  # float32
  # The sampler step that committed each completion position (-1 on the prompt): the denoising path
  # the trajectory estimator scores.
  commit_step_NxT: jax.Array  # int32


class Prepared(struct.PyTreeNode):
  """`prepare`'s output: every inner update's masks and inputs, and the old policy's and the
  reference's likelihoods under them (`l` and per-token log-probabilities, `Likelihood`)."""

  masks_IxKxNxT: jax.Array
  inputs_IxNxT: jax.Array
  l_old_IxN: jax.Array
  l_ref_IxN: jax.Array
  logp_old_IxNxT: jax.Array
  logp_ref_IxNxT: jax.Array
  l_ref_Ix2xN: jax.Array  # the reference's surrogate on each of two independent halves of the masks
  scored_NxT: jax.Array  # what the likelihoods score: the completion (or up to its first EOS)


class Rows(struct.PyTreeNode):
  """One inner update's data: the rollout and that update's slice of `Prepared`."""

  tokens_NxT: jax.Array
  valid_NxT: jax.Array
  prompt_NxT: jax.Array
  completion_NxT: jax.Array
  rewards_N: jax.Array
  masks_KxNxT: jax.Array
  inputs_NxT: jax.Array
  l_old_N: jax.Array
  l_ref_N: jax.Array
  logp_old_NxT: jax.Array
  logp_ref_NxT: jax.Array
  l_ref_2xN: jax.Array
  scored_NxT: jax.Array
  commit_step_NxT: jax.Array
  # The whole batch's scored tokens per row, on every row: the "token" aggregation's denominator, so a
  # micro-batch's loss is its share of the batch's token mean.
  tokens_per_row_N: jax.Array

  @classmethod
  def of(cls, rollout: Rollout, prepared: Prepared, i) -> Rows:
    return cls(
      tokens_NxT=rollout.tokens_NxT,
      valid_NxT=rollout.valid_NxT,
      prompt_NxT=rollout.prompt_NxT,
      completion_NxT=rollout.completion_NxT,
      rewards_N=rollout.rewards_N,
      masks_KxNxT=prepared.masks_IxKxNxT[i],
      inputs_NxT=prepared.inputs_IxNxT[i],
      l_old_N=prepared.l_old_IxN[i],
      l_ref_N=prepared.l_ref_IxN[i],
      logp_old_NxT=prepared.logp_old_IxNxT[i],
      logp_ref_NxT=prepared.logp_ref_IxNxT[i],
      l_ref_2xN=prepared.l_ref_Ix2xN[i],
      scored_NxT=prepared.scored_NxT,
      commit_step_NxT=rollout.commit_step_NxT,
      tokens_per_row_N=jnp.full_like(
        rollout.rewards_N, prepared.scored_NxT.sum() / prepared.scored_NxT.shape[0], jnp.float32
      ),
    )


class Likelihood(struct.PyTreeNode):
  """What an estimator's `score` gives: `l` per row, per-token log-probabilities (`token`: of the one
  pass; `sequence`: each scored token's mean over the masked copies that mask it, 0 where none does),
  and `l` on each of two independent halves of the masks (the `product` residual's; the same `l` twice
  where the masks do not split)."""

  l_N: jax.Array
  logp_NxT: jax.Array
  l_2xN: jax.Array


class Terms(struct.PyTreeNode):
  """What the loss reads of the policy: `l_theta` per row (and on two independent halves of the
  masks), per-token log-probabilities (`Likelihood.logp_NxT`), and the learned log Z per prompt
  (empty when the objective has none)."""

  l_theta_N: jax.Array
  logp_NxT: jax.Array
  log_z_B: jax.Array
  l_theta_2xN: jax.Array


def _row_axis(name: str) -> int:
  """Where a field's row axis is: the axis of the 'N' (rows) or 'B' (prompts) in its shape suffix
  (masks_KxNxT: 1)."""
  dims = name.rsplit("_", 1)[1].split("x")
  return dims.index("N") if "N" in dims else dims.index("B")


# ----------------------------------------------------------------------------------------------
# Estimators: how a sequence is scored. `draw` gives one inner update's (masks_KxNxT, inputs_NxT);
# `score` the likelihoods `(l_N, logp_NxT)` of `params` on them.


@dataclasses.dataclass(frozen=True)
class Estimator:
  draw: Callable
  score: Callable
  forward_passes: Callable[[ObjectiveConfig], int]  # model passes per row per scoring


def _draw_masked_copies(key, rollout: Rollout, scored_NxT, ocfg, mask_id: int):
  """The sequence-level surrogate's K masks of the scored positions (ocfg.estimator's scheme)."""
  del mask_id
  masks = diffusion.surrogate_masks(
    key, scored_NxT, ocfg.estimator, ocfg.num_masks, ocfg.t_min, ocfg.t_max
  )
  return masks, rollout.tokens_NxT


def log_prob_fn(model):
  """`(params, tokens, valid, targets) -> log-probabilities of the targets` (in chunks when the model
  config's `logits_chunk` says so)."""
  return lambda params, tokens, valid, targets: model.apply(
    {"params": params}, tokens, valid, targets_BxS=targets
  )


def _score_masked_copies(model, params, rows: Rows, ocfg) -> Likelihood:
  """`l(y|x)`: the surrogate over the K masked copies (TraFL, elbo_grpo, wd1)."""
  logp_KxNxT = diffusion.masked_token_log_probs(
    log_prob_fn(model),
    params,
    rows.tokens_NxT,
    rows.valid_NxT,
    rows.masks_KxNxT,
    model.cfg.mask_token_id,
  )
  surrogate = functools.partial(
    diffusion.surrogate_from_log_probs,
    scored_BxT=rows.scored_NxT,
    length_normalize=ocfg.length_normalize,
  )
  l_N = surrogate(logp_KxNxT, rows.masks_KxNxT)
  halves_2xN = jnp.stack([l_N, l_N])
  if ocfg.residual == "product":
    a, b = diffusion.independent_halves(ocfg.estimator, ocfg.num_masks)
    halves_2xN = jnp.stack(
      [
        surrogate(logp_KxNxT[a], rows.masks_KxNxT[a]),
        surrogate(logp_KxNxT[b], rows.masks_KxNxT[b]),
      ]
    )
  # Each token's log-probability in the copies that mask it (the pair's coupled masks: exactly one).
  copies_NxT = rows.masks_KxNxT.sum(0)
  logp_NxT = jnp.where(rows.masks_KxNxT, logp_KxNxT, 0.0).sum(0) / jnp.maximum(copies_NxT, 1)
  return Likelihood(l_N, logp_NxT, halves_2xN)


def _draw_one_step(key, rollout: Rollout, scored_NxT, ocfg, mask_id: int):
  """diffu-GRPO's estimator input: every completion token masked, prompt tokens masked at p."""
  masked_prompt = jax.random.uniform(key, rollout.prompt_NxT.shape) < ocfg.prompt_mask_prob
  masked = rollout.completion_NxT | (masked_prompt & rollout.prompt_NxT)
  masks = jnp.zeros((1,) + scored_NxT.shape, bool)
  return masks, diffusion.apply_mask(rollout.tokens_NxT, masked, mask_id)


def _score_one_step(model, params, rows: Rows, ocfg) -> Likelihood:
  """Per-token log-probabilities of one pass with the completion masked (diffu-GRPO)."""
  del ocfg
  logp_NxT = log_prob_fn(model)(params, rows.inputs_NxT, rows.valid_NxT, rows.tokens_NxT)
  l_N = jnp.where(rows.scored_NxT, logp_NxT, 0.0).sum(-1)
  return Likelihood(l_N, logp_NxT, jnp.stack([l_N, l_N]))


def trajectory_log_probs(
  model, params, tokens_NxT, valid_NxT, commit_step_NxT, scfg: sampler.SamplerConfig
):
  """`log pi(y_j | the state before the step s_j that committed j)` at every completion position j
  (0 on the prompt), `NxT`: the sampler's own log-probabilities (`sampler.committed_log_probs`) of
  the recorded path, from its logits (`sampler.completion_logits`: the same passes, guidance
  included) at its temperature.

  The state before step s is the prompt and the completion tokens committed at steps < s, MASK at the
  others. One pass per step over all rows, in a `lax.scan` over the S steps: one step's logits
  (`NxLxV`) alive at a time; under a gradient the S passes' activations are kept as K masked copies'
  are (the model's `remat` and `rl.micro_batches` bound them).

  With `random` remasking the order of the commits does not depend on the model, so the path's
  probability under `pi` is the sum of these (as log) times an order probability that cancels in
  `pi_theta / pi_ref`. At temperature T it is the path's probability under the tempered policy
  `softmax(logits / T)` that sampled it, for the policy and the reference alike: TraFL's target is
  then the reference sampled at T, tilted by `exp(beta r)` (at T = 1, the models themselves)."""
  length = scfg.gen_length
  p = tokens_NxT.shape[1] - length
  mask_id = model.cfg.mask_token_id
  prompt_NxT = valid_NxT & (commit_step_NxT < 0)  # the prompt's valid positions (classifier-free)
  step_NxL = commit_step_NxT[:, p:]

  def one(logp_NxL, s):
    inputs_NxT = jnp.where(commit_step_NxT >= s, mask_id, tokens_NxT)  # the prompt's steps are -1
    logits_NxLxV = sampler.completion_logits(
      model, params, inputs_NxT, valid_NxT, p, scfg, prompt_NxT
    )
    logp_s_NxL = sampler.committed_log_probs(logits_NxLxV, tokens_NxT[:, p:], scfg)
    return jnp.where(step_NxL == s, logp_s_NxL, logp_NxL), None

  logp_NxL, _ = jax.lax.scan(one, jnp.zeros(step_NxL.shape, jnp.float32), jnp.arange(scfg.steps))
  return jnp.concatenate([jnp.zeros((tokens_NxT.shape[0], p), jnp.float32), logp_NxL], axis=1)


def _draw_trajectory(key, rollout: Rollout, scored_NxT, ocfg, mask_id: int):
  """Nothing to draw: the path is the rollout's own (the scored positions stand in for the masks)."""
  del key, ocfg, mask_id
  return scored_NxT[None], rollout.tokens_NxT


def _score_trajectory(model, params, rows: Rows, ocfg) -> Likelihood:
  """`l(y|x)`: the exact log-probability of the rollout's recorded path (`trajectory_log_probs`) over
  the scored positions (the whole completion: `score_eos_fill` is required); exact, so its two
  "halves" are the same value."""
  logp_NxT = trajectory_log_probs(
    model, params, rows.tokens_NxT, rows.valid_NxT, rows.commit_step_NxT, ocfg.rollout
  )
  l_N = jnp.where(rows.scored_NxT, logp_NxT, 0.0).sum(-1)
  if ocfg.length_normalize:
    l_N = l_N / jnp.maximum(rows.scored_NxT.sum(-1), 1).astype(jnp.float32)
  return Likelihood(l_N, logp_NxT, jnp.stack([l_N, l_N]))


def _trajectory_passes(ocfg) -> int:
  return ocfg.rollout.steps * (2 if ocfg.rollout.cfg_scale > 0 else 1)


ESTIMATORS = {
  "sequence": Estimator(_draw_masked_copies, _score_masked_copies, lambda ocfg: ocfg.num_masks),
  "token": Estimator(_draw_one_step, _score_one_step, lambda ocfg: 1),
  "trajectory": Estimator(_draw_trajectory, _score_trajectory, _trajectory_passes),
}


# ----------------------------------------------------------------------------------------------
# Objectives: `loss(ocfg, terms, rows, group_size) -> (loss, metrics)` and the estimator they use.


@dataclasses.dataclass(frozen=True)
class Objective:
  loss: Callable
  estimator: str


def _grouped(x_N, group_size: int):
  return x_N.reshape(x_N.shape[0] // group_size, group_size)


def _advantages_N(rows: Rows, group_size: int):
  return group_advantages(_grouped(rows.rewards_N, group_size)).reshape(-1)


def _trafl_residual_loss(ocfg, log_z_B, terms: Terms, rows: Rows, group_size: int):
  """TraFL's loss at a given log Z (ocfg.residual's form, importance-weighted if asked)."""
  l_theta, l_ref = _grouped(terms.l_theta_N, group_size), _grouped(rows.l_ref_N, group_size)
  rewards_BxG = _grouped(rows.rewards_N, group_size)
  weights = None
  if ocfg.importance_weights:
    weights = importance_weights(l_theta, _grouped(rows.l_old_N, group_size), ocfg.importance_clip)
  loss, metrics = trafl_loss(log_z_B, l_theta, l_ref, rewards_BxG, ocfg.beta, weights)
  if ocfg.residual == "product":
    l_theta_2xBxG = terms.l_theta_2xN.reshape(2, -1, group_size)
    l_ref_2xBxG = rows.l_ref_2xN.reshape(2, -1, group_size)
    loss, extra = trafl_product_loss(
      log_z_B, l_theta_2xBxG, l_ref_2xBxG, rewards_BxG, ocfg.beta, weights
    )
    metrics.update(extra)
  return loss, metrics


def _trafl(ocfg, terms: Terms, rows: Rows, group_size: int):
  if ocfg.log_z == "mlp" and not ocfg.log_z_bounded:
    return _trafl_residual_loss(ocfg, terms.log_z_B, terms, rows, group_size)
  if ocfg.log_z == "mlp":  # bounded: the policy reads the clipped head, the head its own residual
    log_z_B = bounded_log_z(terms.log_z_B, ocfg)
  else:
    l_theta, l_ref = _grouped(terms.l_theta_N, group_size), _grouped(rows.l_ref_N, group_size)
    rewards_BxG = _grouped(rows.rewards_N, group_size)
    log_z_B = bounded_log_z(batch_mean_log_z(l_theta, l_ref, rewards_BxG, ocfg.beta), ocfg)
  loss, metrics = _trafl_residual_loss(ocfg, log_z_B, terms, rows, group_size)
  if ocfg.log_z in ("centred", "mlp"):
    loss, extra = _with_centred_head(ocfg, loss, terms, rows, group_size)
    metrics.update(extra)
  return loss, metrics


def _with_centred_head(ocfg, policy_loss, terms: Terms, rows: Rows, group_size: int):
  """`log_z = "centred"`: the policy's gradient is `policy_loss`'s (batch_mean's: the residual centred
  per group, `delta_i - mean_group(delta)`, so no common mode `c - b` reaches it), and the learned head
  gets the loss `mlp` gives it with the policy's terms held fixed (the same head gradient), so `log Z(x)`
  stays learned and reported. The value is the policy's loss; the head's is `trafl/head_loss`."""
  held = terms.replace(
    l_theta_N=jax.lax.stop_gradient(terms.l_theta_N),
    l_theta_2xN=jax.lax.stop_gradient(terms.l_theta_2xN),
  )
  head_loss, _ = _trafl_residual_loss(ocfg, terms.log_z_B, held, rows, group_size)
  log_z_B = terms.log_z_B
  return policy_loss + head_loss - jax.lax.stop_gradient(head_loss), {
    "trafl/head_loss": head_loss,
    "trafl/log_z_mean": log_z_B.mean(),  # the head's output, as with mlp
    "trafl/log_z_min": log_z_B.min(),
    "trafl/log_z_max": log_z_B.max(),
  }


def _diffu_grpo(ocfg, terms: Terms, rows: Rows, group_size: int):
  return diffu_grpo_loss(
    terms.logp_NxT,
    rows.logp_old_NxT,
    rows.logp_ref_NxT,
    rows.scored_NxT,
    _advantages_N(rows, group_size),
    ocfg.clip_eps,
    ocfg.kl_coef,
    ocfg.loss_aggregation,
    group_size,
    rows.tokens_per_row_N,
  )


def _elbo_grpo(ocfg, terms: Terms, rows: Rows, group_size: int):
  return elbo_grpo_loss(
    terms.l_theta_N,
    rows.l_old_N,
    rows.l_ref_N,
    terms.logp_NxT,
    rows.logp_ref_NxT,
    rows.scored_NxT,
    _advantages_N(rows, group_size),
    ocfg.clip_eps,
    ocfg.kl_coef,
    ocfg.loss_aggregation,
    group_size,
    rows.tokens_per_row_N,
  )


def _wd1(ocfg, terms: Terms, rows: Rows, group_size: int):
  del ocfg
  advantages_BxG = group_advantages(_grouped(rows.rewards_N, group_size))
  return wd1_loss(_grouped(terms.l_theta_N, group_size), advantages_BxG)


OBJECTIVES = {
  "trafl": Objective(_trafl, "sequence"),
  "diffu_grpo": Objective(_diffu_grpo, "token"),
  "elbo_grpo": Objective(_elbo_grpo, "sequence"),
  "wd1": Objective(_wd1, "sequence"),
}


def estimator_of(ocfg: ObjectiveConfig) -> Estimator:
  """The objective's estimator; `estimator = "trajectory"` replaces the sequence-level surrogate."""
  name = OBJECTIVES[ocfg.objective].estimator
  if name == "sequence" and ocfg.estimator == "trajectory":
    name = "trajectory"
  return ESTIMATORS[name]


def learned_log_z(ocfg: ObjectiveConfig) -> bool:
  """TraFL with the learned head (`log_z = "mlp"` or `"centred"`) trains `log Z_phi(x)`; the rest have
  none."""
  return ocfg.objective == "trafl" and ocfg.log_z in ("mlp", "centred")


def objective_loss(ocfg, terms: Terms, rows: Rows, group_size: int):
  """`(loss, metrics)` of whole prompt groups. Every objective's loss is a mean over prompts or rows,
  so on equal micro-batches the batch's loss is the mean of theirs."""
  loss, extra = OBJECTIVES[ocfg.objective].loss(ocfg, terms, rows, group_size)
  extra["rl/kl_estimate"] = jnp.mean(terms.l_theta_N - rows.l_ref_N)
  return loss, extra
