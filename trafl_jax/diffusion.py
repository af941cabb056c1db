"""Masking and the masked-diffusion (LLaDA pretraining / SFT) loss.

Dimension legend:
  B: batch    T: sequence length    V: vocabulary
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def forward_mask(
  rng: jax.Array, completion_BxT: jax.Array, t_min: float
) -> tuple[jax.Array, jax.Array]:
  """Draws `t ~ U(t_min, 1)` per row and masks each completion token with probability `t`.

  Returns `(masked_BxT, t_B)`. Prompt positions (`completion_BxT == False`) are never masked.
  """
  t_rng, u_rng = jax.random.split(rng)
  b, t = completion_BxT.shape
  t_B = jax.random.uniform(t_rng, (b,), minval=t_min, maxval=1.0)
  u_BxT = jax.random.uniform(u_rng, (b, t))
  masked_BxT = (u_BxT < t_B[:, None]) & completion_BxT
  return masked_BxT, t_B


def token_log_probs(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """log softmax(logits)[target], in float32."""
  logits = logits_BxTxV.astype(jnp.float32)
  target_logit_BxT = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
  return target_logit_BxT - jax.nn.logsumexp(logits, axis=-1)


def masked_diffusion_loss(
  logits_BxTxV: jax.Array,
  targets_BxT: jax.Array,
  masked_BxT: jax.Array,
  t_B: jax.Array,
  completion_BxT: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """LLaDA's loss: cross-entropy on masked positions weighted `1/t`, per row divided by its number of
  completion tokens (EOS fill included, as LLaDA's SFT counts it), averaged over rows."""
  nll_BxT = -token_log_probs(logits_BxTxV, targets_BxT)
  weighted_BxT = jnp.where(masked_BxT, nll_BxT / t_B[:, None], 0.0)
  num_completion_B = jnp.maximum(completion_BxT.sum(axis=-1), 1)
  loss_B = weighted_BxT.sum(axis=-1) / num_completion_B
  num_masked = masked_BxT.sum()
  metrics = {
    "train/loss": loss_B.mean(),
    "train/masked_nll": jnp.where(masked_BxT, nll_BxT, 0.0).sum() / jnp.maximum(num_masked, 1),
    "train/masked_fraction": num_masked / jnp.maximum(completion_BxT.sum(), 1),
  }
  return loss_B.mean(), metrics


def apply_mask(tokens_BxT: jax.Array, masked_BxT: jax.Array, mask_token_id: int) -> jax.Array:
  return jnp.where(masked_BxT, mask_token_id, tokens_BxT)


# ----------------------------------------------------------------------------------------------
# The sequence-level surrogate l(y | x) (DESIGN section 2). K: masks per sequence.

SURROGATE_ESTIMATORS = ("pair", "random_t", "one_step")


def scored_positions(completion_BxT: jax.Array, tokens_BxT: jax.Array, eos_id: int) -> jax.Array:
  """Completion positions up to and including the first EOS (`L_y` of them); the EOS fill after it
  is not scored."""
  eos_BxT = (tokens_BxT == eos_id) & completion_BxT
  # Positions strictly after the first EOS have a cumulative EOS count of at least 1 before them.
  eos_before_BxT = jnp.cumsum(eos_BxT, axis=-1) - eos_BxT
  return completion_BxT & (eos_before_BxT == 0)


def surrogate_masks(
  rng: jax.Array,
  scored_BxT: jax.Array,
  estimator: str,
  num_masks: int,
  t_min: float = 0.2,
  t_max: float = 0.8,
) -> jax.Array:
  """Masks `KxBxT` over the scored positions. `pair`: K/2 coupled pairs (M, complement of M), every
  token masked exactly once per pair; `random_t`: K independent masks; `one_step`: one mask of all of
  them. Draw them once and share them between the policy, the old policy and the reference."""
  b, t = scored_BxT.shape
  if estimator == "one_step":
    return scored_BxT[None]
  if estimator == "pair":
    if num_masks % 2:
      raise ValueError(f"the pair estimator needs an even number of masks, got {num_masks}")
    draws = num_masks // 2
  elif estimator == "random_t":
    draws = num_masks
  else:
    raise ValueError(f"surrogate estimator {estimator!r} is not one of {SURROGATE_ESTIMATORS}")
  t_rng, u_rng = jax.random.split(rng)
  t_Kx1x1 = jax.random.uniform(t_rng, (draws, b, 1), minval=t_min, maxval=t_max)
  masks_KxBxT = (jax.random.uniform(u_rng, (draws, b, t)) < t_Kx1x1) & scored_BxT[None]
  if estimator == "pair":
    masks_KxBxT = jnp.concatenate([masks_KxBxT, ~masks_KxBxT & scored_BxT[None]], axis=0)
  return masks_KxBxT


def independent_halves(estimator: str, num_masks: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices of the masks of two independent halves A and B of `surrogate_masks`' K masks (each half
  a whole number of draws: `pair` keeps a mask with its complement), for the product residual."""
  if estimator == "pair" and num_masks % 4 == 0:
    draw_K = np.arange(num_masks) % (num_masks // 2)  # masks k and k + K/2 are one draw
  elif estimator == "random_t" and num_masks % 2 == 0:
    draw_K = np.arange(num_masks)
  else:
    raise ValueError(
      f"the product residual needs two independent halves of the masks: estimator 'pair' with "
      f"num_masks a multiple of 4, or 'random_t' with an even num_masks (got {estimator!r}, "
      f"{num_masks})"
    )
  return np.flatnonzero(draw_K % 2 == 0), np.flatnonzero(draw_K % 2 == 1)


def surrogate_from_log_probs(
  token_logp_KxBxT: jax.Array,
  masks_KxBxT: jax.Array,
  scored_BxT: jax.Array,
  length_normalize: bool = False,
) -> jax.Array:
  """`l = mean_k (L_y / |M_k|) sum_{j in M_k} log pi(y_j | x, y with M_k masked)`, per sequence.

  A mask that came out empty (possible for short completions) carries no information and is left out of
  the mean rather than counted as zero."""
  length_B = scored_BxT.sum(-1).astype(jnp.float32)
  size_KxB = masks_KxBxT.sum(-1).astype(jnp.float32)
  sums_KxB = jnp.where(masks_KxBxT, token_logp_KxBxT, 0.0).sum(-1)
  nonempty_KxB = size_KxB > 0
  e_KxB = jnp.where(nonempty_KxB, length_B * sums_KxB / jnp.maximum(size_KxB, 1.0), 0.0)
  l_B = e_KxB.sum(0) / jnp.maximum(nonempty_KxB.sum(0), 1)
  if length_normalize:
    l_B = l_B / jnp.maximum(length_B, 1.0)
  return l_B


def masked_token_log_probs(
  log_prob_fn, params, tokens_BxT, valid_BxT, masks_KxBxT, mask_id: int
) -> jax.Array:
  """`log pi(y_j | y with M_k masked)` at every position, for each of the K masks: `KxBxT`.

  `log_prob_fn(params, inputs_NxT, valid_NxT, targets_NxT)` gives each target's log-probability (the
  model called with `targets_BxS`). The K masked copies run as one batch of B*K rows, batch-major, so a
  batch sharded over devices stays sharded the same way (K-major rows would force XLA to reshuffle the
  batch across devices)."""
  k, b, t = masks_KxBxT.shape
  masks_BxKxT = jnp.swapaxes(masks_KxBxT, 0, 1)
  inputs_BxKxT = apply_mask(jnp.broadcast_to(tokens_BxT[:, None], (b, k, t)), masks_BxKxT, mask_id)
  logp_BxKxT = log_prob_fn(
    params,
    inputs_BxKxT.reshape(b * k, t),
    jnp.repeat(valid_BxT, k, axis=0),
    jnp.repeat(tokens_BxT, k, axis=0),
  ).reshape(b, k, t)
  return jnp.swapaxes(logp_BxKxT, 0, 1)
