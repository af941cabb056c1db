"""Where a post-training run stands against TraFL's target `p_ref(y|x) exp(beta r) / Z(x)`, per step.

DESIGN section 2 ("Where a run stands against its target"). Every function is a pure jnp function of one
step's groups; `step_metrics` is rl.update's hook and gives the `diag/*` scalars (README, "Diagnostics").
The likelihoods are the update's masked-diffusion surrogate values (`l_theta` at update time, `l_ref`
from prepare under the same masks), not exact log-probabilities, so every importance weight here is one of
surrogates. A sample is correct when its reward is positive (as rl/all_wrong_groups counts it); the
target's formulas assume a 0/1 reward.

Dimension legend:
  B: prompts    G: samples per prompt    N: B*G rows
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from trafl_jax import objectives

# Difficulty buckets of the reference's estimated success rate p_ref: [lo, hi), the last one closed.
DIFFICULTY = (("hard", 0.0, 0.25), ("medium", 0.25, 0.75), ("easy", 0.75, 1.0))
GROUP_KINDS = ("all_wrong", "mixed", "all_correct")


def masked_mean(x_B, mask_B):
  """The mean of `x_B` where `mask_B`; 0 where the mask is empty (logged with its count, never NaN)."""
  count = jnp.sum(mask_B.astype(jnp.float32))
  return jnp.sum(jnp.where(mask_B, x_B, 0.0)) / jnp.maximum(count, 1.0)


def correct(rewards_BxG):
  return (rewards_BxG > 0).astype(jnp.float32)


def reference_success(rewards_BxG, l_theta_BxG, l_ref_BxG):
  """`(p_ref_B, ess_B)`: the self-normalized importance-weighted estimate of the reference's success
  rate from the policy's samples, `sum(w r) / sum(w)` with `w = exp(l_ref - l_theta)`, and the weights'
  effective sample size `(sum w)^2 / sum w^2` (G when the policy is the reference, 1 when one sample
  carries all the weight)."""
  w_BxG = jax.nn.softmax(l_ref_BxG - l_theta_BxG, axis=1)  # w / sum(w), without overflow
  return jnp.sum(w_BxG * correct(rewards_BxG), axis=1), 1.0 / jnp.sum(w_BxG**2, axis=1)


def target(p_ref_B, beta):
  """`(log_z_star_B, p_star_B, kl_B)` of the tilted target for a reference success rate p_ref:
  `log Z* = log(1 + (e^beta - 1) p_ref)`, the target's success rate `p* = p_ref e^beta / Z*`, and
  `KL(target || ref) = E_target[beta r - log Z*] = p* beta - log Z*`."""
  log_z_star_B = jnp.log1p(jnp.expm1(beta) * p_ref_B)
  p_star_B = p_ref_B * jnp.exp(beta - log_z_star_B)
  return log_z_star_B, p_star_B, p_star_B * beta - log_z_star_B


def achieved_tilt(p_theta_B, p_ref_B):
  """`(tilt_B, valid_B)`: `logit(p_theta) - logit(p_ref)`, which the target makes `beta`, where both
  rates are strictly inside (0, 1) (`valid_B`; elsewhere the tilt is 0 and must be masked)."""
  valid_B = (p_theta_B > 0) & (p_theta_B < 1) & (p_ref_B > 0) & (p_ref_B < 1)
  safe = lambda p: jnp.where(
    valid_B, p, 0.5
  )  # no inf or NaN in the masked branch's gradient either
  return jnp.where(
    valid_B, jax.scipy.special.logit(safe(p_theta_B)) - jax.scipy.special.logit(safe(p_ref_B)), 0.0
  ), valid_B


def balance_log_z(rewards_BxG, l_theta_BxG, l_ref_BxG, beta):
  """`log mean_G exp(beta r - (l_theta - l_ref))`: the group's importance-sampled estimate of the
  `log Z(x)` that balances the policy's current likelihoods (`Z = E_theta[p_ref e^{beta r} / p_theta]`);
  what the learned head tracks."""
  x_BxG = beta * rewards_BxG - (l_theta_BxG - l_ref_BxG)
  return jax.nn.logsumexp(x_BxG, axis=1) - jnp.log(x_BxG.shape[1])


def residual_split(log_z_B, rewards_BxG, l_theta_BxG, l_ref_BxG, beta):
  """`(common_B, centred_sq_B)`: the residual's common mode `c - b = mean_G(delta)` (the head's output
  c minus the group mean b of `beta r - (l_theta - l_ref)`; it multiplies `sum_i grad l_i` in the
  policy gradient) and the mean square of its centred part `delta - mean_G(delta)`."""
  delta_BxG = objectives.trafl_residual(log_z_B, l_theta_BxG, l_ref_BxG, rewards_BxG, beta)
  common_B = delta_BxG.mean(axis=1)
  return common_B, jnp.mean((delta_BxG - common_B[:, None]) ** 2, axis=1)


def group_kinds(rewards_BxG) -> dict[str, jax.Array]:
  """Boolean masks over groups: all samples wrong, some right and some wrong, all right."""
  right_BxG = rewards_BxG > 0
  all_wrong_B, all_correct_B = ~right_BxG.any(axis=1), right_BxG.all(axis=1)
  return {
    "all_wrong": all_wrong_B,
    "mixed": ~all_wrong_B & ~all_correct_B,
    "all_correct": all_correct_B,
  }


def mask_noise(l_theta_a_N, l_ref_a_N, l_theta_b_N, l_ref_b_N):
  """`mean 0.5 (delta_A - delta_B)^2` over rows, with A and B two independent mask draws for the same
  rows and parameters: its expectation is `Var_M(l_theta - l_ref)`, the mask noise one draw's squared
  residual adds (log Z and r do not depend on the masks, so they cancel in `delta_A - delta_B`)."""
  return jnp.mean(0.5 * ((l_theta_a_N - l_ref_a_N) - (l_theta_b_N - l_ref_b_N)) ** 2)


# ----------------------------------------------------------------------------------------------
# The logged scalars


def group_metrics(rewards_BxG, l_theta_BxG, l_ref_BxG, length_BxG, beta) -> dict[str, jax.Array]:
  """Success rates, the reference's estimated rate and its ESS, the target's log Z*, success rate and KL,
  the achieved tilt (overall and by difficulty), and the completion length of right and wrong samples."""
  g = rewards_BxG.shape[1]
  right_BxG = correct(rewards_BxG)
  p_theta_B = right_BxG.mean(axis=1)
  p_ref_B, ess_B = reference_success(rewards_BxG, l_theta_BxG, l_ref_BxG)
  log_z_star_B, p_star_B, kl_B = target(p_ref_B, beta)
  tilt_B, valid_B = achieved_tilt(p_theta_B, p_ref_B)
  out = {
    "diag/success_rate": p_theta_B.mean(),
    "diag/p_ref_iw": p_ref_B.mean(),
    "diag/iw_ess": ess_B.mean(),
    "diag/iw_ess_frac": ess_B.mean() / g,
    "diag/log_z_star": log_z_star_B.mean(),
    "diag/p_target": p_star_B.mean(),
    "diag/kl_target": kl_B.mean(),
    "diag/tilt": masked_mean(tilt_B, valid_B),
    "diag/tilt_groups": valid_B.sum().astype(jnp.float32),
  }
  for name, lo, hi in DIFFICULTY:
    upper = p_ref_B <= hi if hi >= 1.0 else p_ref_B < hi
    in_bucket_B = valid_B & (p_ref_B >= lo) & upper
    out[f"diag/tilt_{name}"] = masked_mean(tilt_B, in_bucket_B)
    out[f"diag/tilt_{name}_groups"] = in_bucket_B.sum().astype(jnp.float32)
  right_N, length_N = right_BxG.reshape(-1) > 0, length_BxG.reshape(-1)
  out["diag/length_correct"] = masked_mean(length_N, right_N)
  out["diag/length_wrong"] = masked_mean(length_N, ~right_N)
  return out


def head_metrics(log_z_B, rewards_BxG, l_theta_BxG, l_ref_BxG, beta) -> dict[str, jax.Array]:
  """The learned head's error against its group's balancing log Z: bias (mean) and RMSE."""
  err_B = log_z_B - balance_log_z(rewards_BxG, l_theta_BxG, l_ref_BxG, beta)
  return {"diag/head_bias": err_B.mean(), "diag/head_rmse": jnp.sqrt(jnp.mean(err_B**2))}


def residual_metrics(log_z_B, rewards_BxG, l_theta_BxG, l_ref_BxG, beta) -> dict[str, jax.Array]:
  """The residual's common mode (signed mean and mean square) and centred part (mean square), for each
  kind of group, with the number of groups of that kind (a kind that is absent logs 0 and count 0)."""
  common_B, centred_sq_B = residual_split(log_z_B, rewards_BxG, l_theta_BxG, l_ref_BxG, beta)
  out = {}
  for kind, mask_B in group_kinds(rewards_BxG).items():
    out[f"diag/common_{kind}"] = masked_mean(common_B, mask_B)
    out[f"diag/common_sq_{kind}"] = masked_mean(common_B**2, mask_B)
    out[f"diag/centred_sq_{kind}"] = masked_mean(centred_sq_B, mask_B)
    out[f"diag/groups_{kind}"] = mask_B.sum().astype(jnp.float32)
  return out


def step_metrics(ocfg, terms, rows, group_size: int, length_N) -> dict[str, jax.Array]:
  """rl.update's `diag/*` scalars from the whole batch's (gradient-free) terms. Every objective gets the
  group metrics (at its `beta`: where it stands against TraFL's target at that beta); TraFL also gets the
  residual split (with the log Z its loss uses: the head's, or batch_mean's `b`, whose common mode is 0)
  and, with a learned head (`mlp`, `centred`), the head's error."""
  grouped = lambda x_N: x_N.reshape(-1, group_size)
  rewards_BxG, length_BxG = grouped(rows.rewards_N), grouped(length_N)
  l_theta_BxG, l_ref_BxG = grouped(terms.l_theta_N), grouped(rows.l_ref_N)
  beta = ocfg.beta
  out = group_metrics(rewards_BxG, l_theta_BxG, l_ref_BxG, length_BxG, beta)
  if ocfg.objective != "trafl":
    return out
  if objectives.learned_log_z(ocfg):
    log_z_B = terms.log_z_B
    out.update(head_metrics(log_z_B, rewards_BxG, l_theta_BxG, l_ref_BxG, beta))
  else:
    log_z_B = objectives.batch_mean_log_z(l_theta_BxG, l_ref_BxG, rewards_BxG, beta)
  out.update(residual_metrics(log_z_B, rewards_BxG, l_theta_BxG, l_ref_BxG, beta))
  return out
