"""Masking and the masked-diffusion (LLaDA pretraining / SFT) loss.

Dimension legend:
  B: batch    T: sequence length    V: vocabulary
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
