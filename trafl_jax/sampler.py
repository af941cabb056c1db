"""LLaDA's denoising sampler as one jitted function (DESIGN section 4).

The completion region (`gen_length` positions after the left-padded prompt) starts as MASK. It is decoded in
blocks of `block_length`, left to right; `steps` is split evenly over the blocks, and within a block the
number of tokens committed per step is the block's size split evenly over its steps, remainder first. Each
step runs the model over the whole sequence, samples a token at every position (Gumbel-max at
`temperature`, argmax at 0, over the whole vocabulary as LLaDA does), scores it (`low_confidence`: its
softmax probability; `random`: a uniform draw), and commits the top-k still-masked positions of the current
block and earlier. Committed tokens never change. Besides the tokens it records, for every completion
position, the step that committed it and the log-probability of the committed token under the distribution
it was drawn from (`committed_log_probs`): the rollout's denoising path, which the trajectory estimator
(objectives.py) scores again under other parameters.

Dimension legend:
  B: batch    P: prompt length    L: gen_length    T: P + L    V: vocabulary    S: steps
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from trafl_jax import sharding

REMASKING = ("low_confidence", "random")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  gen_length: int = 128
  steps: int = 64
  block_length: int = 32
  temperature: float = 0.0
  remasking: str = "low_confidence"
  cfg_scale: float = 0.0

  def __post_init__(self):
    if self.gen_length <= 0 or self.block_length <= 0 or self.steps <= 0:
      raise ValueError(f"sampler lengths and steps must be positive: {self}")
    if self.gen_length % self.block_length:
      raise ValueError(
        f"gen_length {self.gen_length} is not a multiple of block_length {self.block_length}"
      )
    if self.steps % self.num_blocks:
      raise ValueError(
        f"steps {self.steps} does not split evenly over {self.num_blocks} blocks "
        f"(gen_length {self.gen_length} / block_length {self.block_length})"
      )
    if self.steps_per_block > self.block_length:
      raise ValueError(
        f"{self.steps_per_block} steps per block would commit nothing at some steps of a "
        f"{self.block_length}-token block; use steps <= gen_length"
      )
    if self.remasking not in REMASKING:
      raise ValueError(f"remasking {self.remasking!r} is not one of {REMASKING}")
    if self.temperature < 0 or self.cfg_scale < 0:
      raise ValueError(f"temperature and cfg_scale must be >= 0: {self}")

  @property
  def num_blocks(self) -> int:
    return self.gen_length // self.block_length

  @property
  def steps_per_block(self) -> int:
    return self.steps // self.num_blocks


def commit_schedule(cfg: SamplerConfig) -> np.ndarray:
  """Tokens committed at each of the `steps` steps (LLaDA's `get_num_transfer_tokens` per block)."""
  spb = cfg.steps_per_block
  base, remainder = divmod(cfg.block_length, spb)
  per_block = np.full(spb, base, np.int32)
  per_block[:remainder] += 1
  return np.tile(per_block, cfg.num_blocks)


def chosen_probability(logits_BxLxV: jax.Array, tokens_BxL: jax.Array) -> jax.Array:
  """`softmax(logits)[token]` in float32: LLaDA's low-confidence score (`F.softmax`, then `gather`).

  Not `exp(logit - logsumexp)`: that rounds `logsumexp` to a float32 of the logits' magnitude before
  exponentiating, so confidences are resolved only to that float's ulp (relative 5e-7 for a logsumexp in
  [4, 8), 2e-6 in [16, 32)); two that differ by less come out equal, and the stable top-k then commits
  the lower-index position where LLaDA commits the more confident one. Dividing by the summed
  exponentials, as softmax does, rounds only the probability and its normalizer. (LLaDA takes this
  softmax in float64 on CUDA and in float32 on MPS; JAX computes in float32 unless x64 is enabled.)
  The softmax is written out so that only reductions run over V: `jax.nn.softmax` and a gather would
  hold a second float32 BxLxV array (1 GiB at B*L = 2048 with LLaDA's 126,464 tokens). The value is
  the same (bit for bit for the argmax token, the greedy case).
  """
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  max_BxLx1 = jnp.max(logits_BxLxV, axis=-1, keepdims=True)
  normalizer_BxL = jnp.sum(jnp.exp(logits_BxLxV - max_BxLx1), axis=-1)
  chosen_BxL = jnp.take_along_axis(logits_BxLxV, tokens_BxL[..., None], axis=-1)[..., 0]
  return jnp.exp(chosen_BxL - max_BxLx1[..., 0]) / normalizer_BxL


def top_k_mask(score_BxL: jax.Array, eligible_BxL: jax.Array, k: jax.Array) -> jax.Array:
  """The `k` highest-scoring eligible positions of each row (ties to the lower index), as a mask.

  `k` may be traced: every position is ranked and ranks below `k` are kept."""
  score_BxL = jnp.where(eligible_BxL, score_BxL, -jnp.inf)
  order_BxL = jnp.argsort(-score_BxL, axis=-1, stable=True)
  rank_BxL = jnp.argsort(order_BxL, axis=-1, stable=True)
  return (rank_BxL < k) & eligible_BxL


def committed_log_probs(logits_BxLxV: jax.Array, tokens_BxL: jax.Array, temperature: float):
  """`log softmax(logits / temperature)[token]` in float32: the log-probability of a token under the
  distribution the sampler draws it from (Gumbel-max at `temperature`). At temperature 0 (greedy, a
  point mass) it is the model's own `log softmax(logits)[token]`. Written as reductions over V, as
  `chosen_probability` is, so no second BxLxV array is held."""
  scaled_BxLxV = logits_BxLxV.astype(jnp.float32) / (temperature if temperature > 0 else 1.0)
  chosen_BxL = jnp.take_along_axis(scaled_BxLxV, tokens_BxL[..., None], axis=-1)[..., 0]
  return chosen_BxL - jax.nn.logsumexp(scaled_BxLxV, axis=-1)


def completion_logits(
  model, params, tokens_BxT, valid_BxT, prompt_len: int, cfg: SamplerConfig, prompt_BxT
):
  """Completion logits, with classifier-free guidance when `cfg_scale > 0` (one batched pass). The
  trajectory estimator calls it too, so it scores exactly the logits the sampler drew from."""
  if cfg.cfg_scale > 0:
    unconditional_BxT = jnp.where(prompt_BxT, model.cfg.mask_token_id, tokens_BxT)
    both = jnp.concatenate([tokens_BxT, unconditional_BxT], axis=0)
    logits = model.apply(
      {"params": params}, both, jnp.concatenate([valid_BxT, valid_BxT]), logits_from=prompt_len
    )
    cond_BxLxV, uncond_BxLxV = jnp.split(logits, 2, axis=0)
    return uncond_BxLxV + (cfg.cfg_scale + 1.0) * (cond_BxLxV - uncond_BxLxV)
  return model.apply({"params": params}, tokens_BxT, valid_BxT, logits_from=prompt_len)


def prepare(prompt_BxP: jax.Array, prompt_valid_BxP: jax.Array, cfg: SamplerConfig, mask_id: int):
  """The starting sequence (prompt, then `gen_length` MASKs), its key-padding mask, and the prompt."""
  b = prompt_BxP.shape[0]
  length = cfg.gen_length
  tokens_BxT = jnp.concatenate(
    [prompt_BxP.astype(jnp.int32), jnp.full((b, length), mask_id, jnp.int32)], axis=1
  )
  valid_BxT = jnp.concatenate([prompt_valid_BxP.astype(bool), jnp.ones((b, length), bool)], axis=1)
  prompt_BxT = jnp.concatenate(
    [prompt_valid_BxP.astype(bool), jnp.zeros((b, length), bool)], axis=1
  )
  return tokens_BxT, valid_BxT, prompt_BxT


def denoise_step(
  i: jax.Array,
  tokens_BxT: jax.Array,
  commit_step_BxL: jax.Array,
  logp_BxL: jax.Array,
  *,
  params,
  valid_BxT: jax.Array,
  prompt_BxT: jax.Array,
  rng: jax.Array,
  model: nn.Module,
  cfg: SamplerConfig,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One step: sample every position, commit the top-k eligible ones by confidence; the committed
  positions record the step and the sampled token's log-probability (`committed_log_probs`)."""
  b = tokens_BxT.shape[0]
  length = cfg.gen_length
  p = tokens_BxT.shape[1] - length
  mask_id = model.cfg.mask_token_id
  logits_BxLxV = completion_logits(model, params, tokens_BxT, valid_BxT, p, cfg, prompt_BxT)
  step_rng = jax.random.fold_in(rng, i)
  if cfg.temperature > 0:
    # argmax(logits / T + Gumbel) samples softmax(logits / T); LLaDA writes the same draw as
    # exp(logits) / (-log u)^T.
    gumbel_BxLxV = jax.random.gumbel(step_rng, logits_BxLxV.shape, jnp.float32)
    sampled_BxL = jnp.argmax(logits_BxLxV / cfg.temperature + gumbel_BxLxV, axis=-1)
  else:
    sampled_BxL = jnp.argmax(logits_BxLxV, axis=-1)
  if cfg.remasking == "low_confidence":
    confidence_BxL = chosen_probability(logits_BxLxV, sampled_BxL)
  else:
    confidence_BxL = jax.random.uniform(jax.random.fold_in(step_rng, 1), (b, length))
  completion_BxL = tokens_BxT[:, p:]
  # As in LLaDA, "still masked" means "holds the MASK id".
  masked_BxL = completion_BxL == mask_id
  block_end = (i // cfg.steps_per_block + 1) * cfg.block_length
  eligible_BxL = masked_BxL & (jnp.arange(length) < block_end)[None, :]
  commit_BxL = top_k_mask(confidence_BxL, eligible_BxL, jnp.asarray(commit_schedule(cfg))[i])
  completion_BxL = jnp.where(commit_BxL, sampled_BxL.astype(jnp.int32), completion_BxL)
  commit_step_BxL = jnp.where(commit_BxL, i, commit_step_BxL)
  logp_sampled_BxL = committed_log_probs(logits_BxLxV, sampled_BxL, cfg.temperature)
  logp_BxL = jnp.where(commit_BxL, logp_sampled_BxL, logp_BxL)
  return tokens_BxT.at[:, p:].set(completion_BxL), commit_step_BxL, logp_BxL


def generate(
  params,
  prompt_BxP: jax.Array,
  prompt_valid_BxP: jax.Array,
  rng: jax.Array,
  *,
  model: nn.Module,
  cfg: SamplerConfig,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Returns `(completion_BxL, commit_step_BxL, logp_BxL)`: the tokens, the step that committed each,
  and its log-probability under the distribution it was drawn from at that step (`committed_log_probs`:
  at temperature T, `log softmax(logits / T)`). With `random` remasking the order of the commits does
  not depend on the model, and `logp_BxL.sum(-1)` is the log-probability of the rollout's path up to
  that order's probability. (A sampled MASK id stays eligible, as in LLaDA, and is committed again
  later; only the last commit of a position is recorded.)"""
  p = prompt_BxP.shape[1]
  tokens_BxT, valid_BxT, prompt_BxT = prepare(
    prompt_BxP, prompt_valid_BxP, cfg, model.cfg.mask_token_id
  )
  step = functools.partial(
    denoise_step,
    params=params,
    valid_BxT=valid_BxT,
    prompt_BxT=prompt_BxT,
    rng=rng,
    model=model,
    cfg=cfg,
  )
  shape_BxL = tokens_BxT[:, p:].shape
  init = (tokens_BxT, jnp.full(shape_BxL, -1, jnp.int32), jnp.zeros(shape_BxL, jnp.float32))
  tokens_BxT, commit_step_BxL, logp_BxL = jax.lax.fori_loop(
    0, cfg.steps, lambda i, c: step(i, *c), init
  )
  return tokens_BxT[:, p:], commit_step_BxL, logp_BxL


def make_generate_fn(model: nn.Module, cfg: SamplerConfig, mesh, rules, param_shardings):
  """`(params, prompt_BxP, prompt_valid_BxP, rng) -> (completion_BxL, commit_step_BxL, logp_BxL)`, jitted once
  per prompt shape with the batch sharded on the data axes and parameters as in training."""
  batch = sharding.batch_sharding(mesh, rules)
  fn = jax.jit(
    functools.partial(generate, model=model, cfg=cfg),
    in_shardings=(param_shardings, batch, batch, sharding.replicated(mesh)),
    out_shardings=(batch, batch, batch),
  )

  def run(params, prompt_BxP, prompt_valid_BxP, rng):
    # Host prompts (the same on every process) become global arrays; callers with process-local
    # rows pass arrays built by `sharding.global_batch`.
    if not isinstance(prompt_BxP, jax.Array):
      prompt_BxP = sharding.to_global(prompt_BxP, batch)
    if not isinstance(prompt_valid_BxP, jax.Array):
      prompt_valid_BxP = sharding.to_global(prompt_valid_BxP, batch)
    if jax.process_count() > 1 and getattr(rng, "is_fully_addressable", True):
      rng = sharding.to_global(np.asarray(jax.device_get(rng)), sharding.replicated(mesh))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return fn(params, prompt_BxP, prompt_valid_BxP, rng)

  run.jitted = fn
  return run


def completion_lengths(completion_BxL: np.ndarray, eos_id: int) -> np.ndarray:
  """Tokens up to and including the first EOS (all of them when there is none): `L_y` of DESIGN 2."""
  is_eos_BxL = np.asarray(completion_BxL) == eos_id
  first_B = np.where(is_eos_BxL.any(-1), is_eos_BxL.argmax(-1) + 1, is_eos_BxL.shape[-1])
  return first_B.astype(np.int32)
