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

Modes (`SamplerConfig`, composable; the defaults are LLaDA's exact semantics):
  cache="prefix"  each block starts with a full pass that also returns every layer's keys and values;
                  the block's later steps compute only the block and what follows it, reusing the
                  prompt's and finished blocks' keys and values from that pass (Fast-dLLM's prefix cache).
  cache="dual"    also reuses the not-yet-decoded suffix's: a step computes only the block's positions.
  refresh_every   with a cache, also recompute it every this many steps of a block (1: every step, the
                  exact sampler's logits; 0: once per block).
  threshold       commit every eligible position whose confidence exceeds it, and at least the most
                  confident: a block takes as many steps as it needs (at most its length). 0: LLaDA's
                  per-step commit counts.
  threshold_floor what a thresholded step commits at least: "one" (the most confident: Fast-dLLM's
                  parallel decoding) or "schedule" (the exact schedule's count for the step, so a block
                  never takes more steps than the exact sampler's; threshold 1.0 is the exact sampler).
  stop_at_eos     once a row has committed an EOS and everything before it, its remaining MASKs become
                  EOS (log-probability 0: not drawn) and it computes no more; the batch stops when every
                  row has.
  micro_batch     rows per pass: a batch of B rows runs as B / micro_batch passes in a loop (memory).
A cached step's logits differ from the exact ones (stale keys and values), so a cached rollout is off the
policy's exact sampling distribution: its recorded log-probabilities are the ones it was drawn with.
Cached modes draw temperature noise for the computed positions only (the same distribution, other
draws), and an earlier block's position holding a sampled MASK id is not decoded again.

Dimension legend:
  B: batch    P: prompt length    L: gen_length    T: P + L    V: vocabulary    S: steps
  W: the positions a step computes (L without a cache; the block, or the block and its suffix, with)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from trafl_jax import sharding

# Which positions a step commits: the most confident (`low_confidence`: the chosen token's
# probability; `margin`: top-1 minus top-2 probability; `entropy`: minus the entropy), a uniform
# draw (`random`), or each masked position with probability 1 - s/t (`origin`: Dream's schedule only).
REMASKING = ("low_confidence", "random", "margin", "entropy", "origin")
CONFIDENCE = ("low_confidence", "margin", "entropy")
# Whose generate(): LLaDA's per-block commit counts, or Dream's `linspace(1, eps, steps + 1)` ones.
SCHEDULES = ("llada", "dream")
# Dream's `diffusion_generate(alg=...)` as this sampler's remasking (with schedule="dream").
DREAM_ALGS = {
  "origin": "origin",
  "maskgit_plus": "low_confidence",
  "topk_margin": "margin",
  "entropy": "entropy",
}
CACHES = ("none", "prefix", "dual")
# SamplerConfig's speed settings, set together (config sections rl.rollout and eval.sampler).
MODE_FIELDS = (
  "cache",
  "refresh_every",
  "threshold",
  "threshold_floor",
  "stop_at_eos",
  "micro_batch",
)
# What a thresholded step commits at least: the most confident position, or the exact schedule's count.
THRESHOLD_FLOORS = ("one", "schedule")
# Its other settings a config section may set beside them (Dream's generate(), top-p and top-k).
DRAW_FIELDS = ("schedule", "top_p", "top_k", "alg_temp", "eps")
SECTION_FIELDS = MODE_FIELDS + DRAW_FIELDS


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  gen_length: int = 128
  steps: int = 64
  block_length: int = 32
  temperature: float = 0.0
  remasking: str = "low_confidence"
  cfg_scale: float = 0.0
  cache: str = "none"
  refresh_every: int = 0
  threshold: float = 0.0
  threshold_floor: str = "one"
  stop_at_eos: bool = False
  micro_batch: int = 0
  schedule: str = "llada"
  top_p: float = 1.0
  top_k: int = 0
  alg_temp: float = 0.0
  eps: float = 1e-3

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
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule {self.schedule!r} is not one of {SCHEDULES}")
    if self.schedule == "llada" and self.steps_per_block > self.block_length:
      raise ValueError(
        f"{self.steps_per_block} steps per block would commit nothing at some steps of a "
        f"{self.block_length}-token block; use steps <= gen_length"
      )
    if self.remasking not in REMASKING:
      raise ValueError(f"remasking {self.remasking!r} is not one of {REMASKING}")
    if self.temperature < 0 or self.cfg_scale < 0:
      raise ValueError(f"temperature and cfg_scale must be >= 0: {self}")
    if self.cache not in CACHES:
      raise ValueError(f"cache {self.cache!r} is not one of {CACHES}")
    if self.refresh_every < 0 or self.micro_batch < 0:
      raise ValueError(f"refresh_every and micro_batch must be >= 0: {self}")
    if not 0.0 <= self.threshold <= 1.0:
      raise ValueError(f"threshold {self.threshold} is not in [0, 1] (0: LLaDA's schedule)")
    if self.threshold_floor not in THRESHOLD_FLOORS:
      raise ValueError(f"threshold_floor {self.threshold_floor!r} is not one of {THRESHOLD_FLOORS}")
    if self.remasking == "origin" and self.schedule != "dream":
      raise ValueError(
        "remasking 'origin' reveals with probability 1 - s/t: it needs schedule 'dream'"
      )
    if not 0.0 < self.top_p <= 1.0 or self.top_k < 0:
      raise ValueError(f"top_p must be in (0, 1] and top_k >= 0 (0: off): {self}")
    if not 0.0 < self.eps < 1.0:
      raise ValueError(f"eps {self.eps} (Dream's last timestep) is not in (0, 1)")
    if self.alg_temp < 0 or (self.alg_temp and self.remasking not in CONFIDENCE):
      raise ValueError(
        f"alg_temp {self.alg_temp} must be >= 0, and it draws positions by confidence: it needs "
        f"remasking in {CONFIDENCE}, not {self.remasking!r}"
      )
    if self.threshold and self.remasking != "low_confidence":
      raise ValueError(
        f"threshold compares the model's confidence: it needs remasking 'low_confidence', not "
        f"{self.remasking!r}"
      )

  @property
  def mode(self) -> str:
    """`exact`, or the fast modes joined by `+` (`dual+t0.9+eos`; `prefix/r4`: refreshed every 4
    steps): what produced a rollout, and the tag of an evaluation row."""
    parts = []
    if self.cache != "none":
      parts.append(self.cache + (f"/r{self.refresh_every}" if self.refresh_every else ""))
    if self.threshold:
      parts.append(f"t{self.threshold:g}" + ("s" if self.threshold_floor == "schedule" else ""))
    if self.stop_at_eos:
      parts.append("eos")
    return "+".join(parts) or "exact"

  @property
  def draw_tag(self) -> str:
    """The non-default draw settings (`dream+p0.95+a0.5`), '' for LLaDA's: part of a row's label."""
    parts = ["dream"] if self.schedule == "dream" else []
    for name, value, default in (
      ("p", self.top_p, 1.0),
      ("k", self.top_k, 0),
      ("a", self.alg_temp, 0.0),
    ):
      if value != default:
        parts.append(f"{name}{value:g}")
    return "+".join(parts)

  @property
  def exact(self) -> bool:
    """LLaDA's semantics: no cache, the per-step commit counts, every block decoded."""
    return self.cache == "none" and not self.threshold and not self.stop_at_eos

  @property
  def steps_bound_per_block(self) -> int:
    """Steps a block may take: its length with a threshold that commits at least one position a
    step, the schedule's otherwise."""
    if self.threshold and self.threshold_floor == "one":
      return self.block_length
    return self.steps_per_block

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


def dream_timesteps(steps: int, eps: float) -> np.ndarray:
  """`torch.linspace(1, eps, steps + 1)` in float32 as torch computes it on CPU: `start + delta * i`
  for the first half and `end - delta * (n - 1 - i)` for the second (so the last value is `eps`), each
  a fused multiply-add (one rounding; emulated in float64, where the product is exact). Equal bit for
  bit to torch's values (tests/fixtures/dream); Dream's per-step counts are floors of products with
  these, so an ulp can move a token from one step to the next."""
  n = steps + 1
  start, end = np.float32(1.0), np.float32(eps)
  delta = np.float64((end - start) / np.float32(n - 1))
  i = np.arange(n, dtype=np.float64)
  head = (delta * i + np.float64(start)).astype(np.float32)
  tail = (-delta * (n - 1 - i) + np.float64(end)).astype(np.float32)
  return np.where(i < n // 2, head, tail).astype(np.float32)


def dream_ratios(cfg: SamplerConfig) -> np.ndarray:
  """Dream's `1 - s / t` of each step of a block (float32, as torch computes it), 1 at the last
  step: a confidence rule commits `floor(masks * ratio)` of a row's masked positions, `origin`
  reveals each with that probability."""
  t = dream_timesteps(cfg.steps_per_block, cfg.eps)
  ratios = np.float32(1.0) - t[1:] / t[:-1]
  ratios[-1] = 1.0
  return ratios.astype(np.float32)


def processed_logits(logits_BxLxV: jax.Array, cfg: SamplerConfig) -> jax.Array:
  """The logits tokens are drawn from, float32: divided by the temperature (when > 0), then
  Dream's top-p (the smallest set of most likely tokens whose probability reaches `top_p`, the most
  likely always kept: `top_p_threshold`), then top-k (the `top_k` largest, ties with the k-th kept);
  removed tokens get float32's lowest value, as Dream's `top_p_logits` / `top_k_logits` do."""
  x_BxLxV = logits_BxLxV.astype(jnp.float32)
  if cfg.temperature > 0:
    x_BxLxV = x_BxLxV / cfg.temperature
  lowest = jnp.finfo(jnp.float32).min
  if cfg.top_p < 1.0:
    x_BxLxV = jnp.where(x_BxLxV < top_p_threshold(x_BxLxV, cfg.top_p), lowest, x_BxLxV)
  if cfg.top_k:
    kth_BxLx1 = jax.lax.top_k(x_BxLxV, min(cfg.top_k, x_BxLxV.shape[-1]))[0][..., -1:]
    x_BxLxV = jnp.where(x_BxLxV < kth_BxLx1, lowest, x_BxLxV)
  return x_BxLxV


def _sortable(x: jax.Array) -> jax.Array:
  """float32 -> int32 with the same order (negative floats' magnitude bits flipped)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _unsortable(key: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(
    jnp.where(key < 0, key ^ jnp.int32(0x7FFFFFFF), key), jnp.float32
  )


def top_p_threshold(x_BxLxV: jax.Array, top_p: float) -> jax.Array:
  """The smallest logit Dream's top-p keeps, `[B, L, 1]`: Dream sorts the vocabulary and keeps a token
  while the probability of the tokens before it is at most `top_p`, i.e. it keeps exactly the tokens
  whose logit `l` has `mass_above(l) = sum(p[x > l]) <= top_p`. `mass_above` does not increase with
  `l`, so the threshold is found by bisection over the float32 values between the row's minimum and
  maximum (33 halvings of their int32 keys, each a reduction over V): no sorted copy of the BxLxV
  logits is held. The same set as the sort up to float32 rounding of the mass at the boundary (the
  summation orders differ): at 152,064 flat logits, 13,560 kept, 3% of positions differ by one token
  (scripts/bench_top_p.py; 13x faster on CPU, half the temporaries)."""
  x_BxLxV = x_BxLxV.astype(jnp.float32)
  max_BxLx1 = jnp.max(x_BxLxV, axis=-1, keepdims=True)
  normalizer_BxLx1 = jnp.sum(jnp.exp(x_BxLxV - max_BxLx1), axis=-1, keepdims=True)

  def mass_above(t_BxLx1):
    above_BxLxV = x_BxLxV > t_BxLx1
    return jnp.sum(jnp.where(above_BxLxV, jnp.exp(x_BxLxV - max_BxLx1), 0.0), -1, keepdims=True)

  # Invariant: the answer's key is in (lo, hi]; hi (the maximum) always qualifies (nothing is above).
  lo = _sortable(jnp.min(x_BxLxV, axis=-1, keepdims=True)) - 1
  hi = _sortable(max_BxLx1)

  def halve(_, bounds):
    lo, hi = bounds
    mid = (lo & hi) + ((lo ^ hi) >> 1)  # floor((lo + hi) / 2) without int32 overflow
    ok = mass_above(_unsortable(mid)) <= top_p * normalizer_BxLx1
    return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

  _, hi = jax.lax.fori_loop(0, 33, halve, (lo, hi))
  return _unsortable(hi)


def confidence(logits_BxLxV: jax.Array, tokens_BxL: jax.Array, remasking: str) -> jax.Array:
  """A confidence rule's score of each position (higher commits first), from the softmax of
  `logits`: the chosen token's probability (`low_confidence`), top-1 minus top-2 probability
  (`margin`), or `sum p log(p + 1e-10)` (`entropy`: minus the entropy, as Dream writes it)."""
  if remasking == "low_confidence":
    return chosen_probability(logits_BxLxV, tokens_BxL)
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  max_BxLx1 = jnp.max(logits_BxLxV, axis=-1, keepdims=True)
  normalizer_BxLx1 = jnp.sum(jnp.exp(logits_BxLxV - max_BxLx1), axis=-1, keepdims=True)
  if remasking == "margin":
    top2_BxLx2 = jax.lax.top_k(logits_BxLxV, 2)[0]
    p_BxLx2 = jnp.exp(top2_BxLx2 - max_BxLx1) / normalizer_BxLx1
    return p_BxLx2[..., 0] - p_BxLx2[..., 1]
  p_BxLxV = jnp.exp(logits_BxLxV - max_BxLx1) / normalizer_BxLx1
  return jnp.sum(p_BxLxV * jnp.log(p_BxLxV + 1e-10), axis=-1)


def committed_log_probs(logits_BxLxV: jax.Array, tokens_BxL: jax.Array, cfg: SamplerConfig):
  """`log softmax(processed_logits(logits))[token]` in float32: the log-probability of a token under
  the distribution the sampler draws it from (temperature, top-p, top-k). At temperature 0 (greedy,
  a point mass) it is the model's own `log softmax(logits)[token]`. Written as reductions over V, as
  `chosen_probability` is, so no second BxLxV array is held (without top-p)."""
  scaled_BxLxV = processed_logits(logits_BxLxV, cfg) if cfg.temperature > 0 else logits_BxLxV
  return _log_prob_of(scaled_BxLxV, tokens_BxL)


def _log_prob_of(scaled_BxLxV, tokens_BxL):
  """`log softmax(scaled)[token]` in float32, as reductions over V."""
  scaled_BxLxV = scaled_BxLxV.astype(jnp.float32)
  chosen_BxL = jnp.take_along_axis(scaled_BxLxV, tokens_BxL[..., None], axis=-1)[..., 0]
  return chosen_BxL - jax.nn.logsumexp(scaled_BxLxV, axis=-1)


def completion_logits(
  model,
  params,
  tokens_BxT,
  valid_BxT,
  prompt_len: int,
  cfg: SamplerConfig,
  prompt_BxT,
  *,
  return_kv: bool = False,
):
  """Completion logits, with classifier-free guidance when `cfg_scale > 0` (one batched pass: the
  conditional rows, then the unconditional ones, whose prompt is MASK). The trajectory estimator calls
  it too, so it scores exactly the logits the sampler drew from. `return_kv` also returns the pass's
  keys and values (the caches; 2B rows with guidance)."""
  if cfg.cfg_scale > 0:
    unconditional_BxT = jnp.where(prompt_BxT, model.cfg.mask_token_id, tokens_BxT)
    tokens_BxT = jnp.concatenate([tokens_BxT, unconditional_BxT], axis=0)
    valid_BxT = jnp.concatenate([valid_BxT, valid_BxT])
  out = model.apply(
    {"params": params}, tokens_BxT, valid_BxT, logits_from=prompt_len, return_kv=return_kv
  )
  logits, kv = out if return_kv else (out, None)
  logits = _guided(logits, cfg)
  return (logits, kv) if return_kv else logits


def window_logits(
  model, params, tokens_BxT, valid_BxT, start, width: int, cache_kv, cfg: SamplerConfig
):
  """Logits of the `width` positions `start`.. (completion positions, whose tokens are the same in
  guidance's conditional and unconditional rows), the other positions' keys and values read from
  `cache_kv`. A shifted model (Dream) predicts position i from position i - 1's state, so it computes
  one position more, from `start - 1` (a prompt or earlier position: `start` is never 0)."""
  shift = int(model.cfg.shift_logits)
  window_BxW = jax.lax.dynamic_slice_in_dim(tokens_BxT, start - shift, width + shift, axis=1)
  if cfg.cfg_scale > 0:
    window_BxW = jnp.concatenate([window_BxW, window_BxW], axis=0)
    valid_BxT = jnp.concatenate([valid_BxT, valid_BxT])
  logits = model.apply(
    {"params": params}, window_BxW, valid_BxT, cache_kv=cache_kv, start=start - shift
  )
  return _guided(logits[:, shift:], cfg)


def _guided(logits, cfg: SamplerConfig):
  if cfg.cfg_scale <= 0:
    return logits
  cond_BxLxV, uncond_BxLxV = jnp.split(logits, 2, axis=0)
  return uncond_BxLxV + (cfg.cfg_scale + 1.0) * (cond_BxLxV - uncond_BxLxV)


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


class Generation(NamedTuple):
  """What the sampler returns: the completion (EOS fill included), the step that committed each
  position (steps are counted over the whole generation; -1: never committed), its log-probability
  under the distribution it was drawn from, and the model evaluations that computed each row."""

  completion_BxL: jax.Array
  commit_step_BxL: jax.Array
  logp_BxL: jax.Array
  nfe_B: jax.Array


class Carry(NamedTuple):
  """The loop's state: the sequence, the `Generation` fields so far, the steps taken, the caches."""

  tokens_BxT: jax.Array
  commit_step_BxL: jax.Array
  logp_BxL: jax.Array
  nfe_B: jax.Array
  step: jax.Array
  cache_kv: tuple | None


def _window(x_BxL: jax.Array, w0, width: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(x_BxL, w0, width, axis=1)


def _put(x_BxL: jax.Array, window_BxW: jax.Array, w0) -> jax.Array:
  return jax.lax.dynamic_update_slice_in_dim(x_BxL, window_BxW, w0, axis=1)


def denoise_step(
  carry: Carry,
  block,
  s,
  *,
  width: int,
  params,
  valid_BxT: jax.Array,
  prompt_BxT: jax.Array,
  rng: jax.Array,
  model: nn.Module,
  cfg: SamplerConfig,
) -> Carry:
  """Step `s` of block `block`: sample the `width` computed positions (the whole completion without a
  cache; from the block's start with one), commit the eligible ones (still MASK, in this block or
  earlier) by LLaDA's count or the threshold; the committed positions record the step and the sampled
  token's log-probability (`committed_log_probs`)."""
  length, bl = cfg.gen_length, cfg.block_length
  p = carry.tokens_BxT.shape[1] - length
  mask_id = model.cfg.mask_token_id
  w0 = 0 if cfg.cache == "none" else block * bl  # first computed completion position
  tokens_BxT, cache_kv = carry.tokens_BxT, carry.cache_kv
  if cfg.cache == "none":
    logits_BxWxV = completion_logits(model, params, tokens_BxT, valid_BxT, p, cfg, prompt_BxT)
  else:

    def full(cache_kv):
      logits_BxLxV, kv = completion_logits(
        model, params, tokens_BxT, valid_BxT, p, cfg, prompt_BxT, return_kv=True
      )
      return _window(logits_BxLxV, w0, width), kv

    def cached(cache_kv):
      logits_BxWxV = window_logits(
        model, params, tokens_BxT, valid_BxT, p + w0, width, cache_kv, cfg
      )
      return logits_BxWxV, cache_kv

    refresh = s == 0
    if cfg.refresh_every:
      refresh |= s % cfg.refresh_every == 0
    logits_BxWxV, cache_kv = jax.lax.cond(refresh, full, cached, cache_kv)
  # Draws are keyed by (block, step in block): the exact mode's key is its global step.
  step_rng = jax.random.fold_in(rng, block * cfg.steps_bound_per_block + s)
  drawn_BxWxV = processed_logits(logits_BxWxV, cfg)
  if cfg.temperature > 0:
    # argmax(logits / T + Gumbel) samples softmax(logits / T); LLaDA writes the same draw as
    # exp(logits) / (-log u)^T, Dream as a categorical draw from the processed softmax.
    gumbel_BxWxV = jax.random.gumbel(step_rng, logits_BxWxV.shape, jnp.float32)
    sampled_BxW = jnp.argmax(drawn_BxWxV + gumbel_BxWxV, axis=-1)
  else:
    sampled_BxW = jnp.argmax(drawn_BxWxV, axis=-1)
  completion_BxW = _window(tokens_BxT[:, p:], w0, width)
  # As in LLaDA, "still masked" means "holds the MASK id".
  position_W = w0 + jnp.arange(width)
  eligible_BxW = (completion_BxW == mask_id) & (position_W < (block + 1) * bl)[None, :]
  commit_BxW = _choose(logits_BxWxV, drawn_BxWxV, sampled_BxW, eligible_BxW, s, step_rng, w0, cfg)
  completion_BxW = jnp.where(commit_BxW, sampled_BxW.astype(jnp.int32), completion_BxW)
  step_BxW = jnp.where(commit_BxW, carry.step, _window(carry.commit_step_BxL, w0, width))
  # `committed_log_probs` on the processed logits the draw already used (top-p is not run twice).
  scaled_BxWxV = drawn_BxWxV if cfg.temperature > 0 else logits_BxWxV
  logp_sampled_BxW = _log_prob_of(scaled_BxWxV, sampled_BxW)
  logp_BxW = jnp.where(commit_BxW, logp_sampled_BxW, _window(carry.logp_BxL, w0, width))
  return Carry(
    jax.lax.dynamic_update_slice_in_dim(tokens_BxT, completion_BxW, p + w0, axis=1),
    _put(carry.commit_step_BxL, step_BxW, w0),
    _put(carry.logp_BxL, logp_BxW, w0),
    carry.nfe_B + _active(carry, block, cfg, mask_id).astype(jnp.int32),
    carry.step + 1,
    cache_kv,
  )


def _choose(logits_BxWxV, drawn_BxWxV, sampled_BxW, eligible_BxW, s, step_rng, w0, cfg):
  """Which eligible positions step `s` of a block commits. LLaDA's schedule scores confidences on
  the model's softmax (as LLaDA does); Dream's on the distribution drawn from (`processed_logits`),
  and commits `floor(masks * (1 - s/t))` of a row's eligible positions (all at the block's last
  step). `alg_temp` draws that many without replacement, with probabilities proportional to
  `exp(confidence / alg_temp)` (Gumbel top-k: Dream's `multinomial` of that softmax). A threshold
  adds every eligible position more confident than it to at least one (`threshold_floor` "one") or
  to the schedule's count ("schedule")."""
  b, width = eligible_BxW.shape
  if cfg.remasking in ("random", "origin"):
    uniform_BxL = jax.random.uniform(jax.random.fold_in(step_rng, 1), (b, cfg.gen_length))
    score_BxW = _window(uniform_BxL, w0, width)
    if cfg.remasking == "origin":
      ratio = jnp.asarray(dream_ratios(cfg))[s]
      return eligible_BxW & ((score_BxW < ratio) | (ratio >= 1.0))
  else:
    scored_BxWxV = drawn_BxWxV if cfg.schedule == "dream" else logits_BxWxV
    score_BxW = confidence(scored_BxWxV, sampled_BxW, cfg.remasking)
    above_BxW = eligible_BxW & (score_BxW > cfg.threshold)
    if cfg.threshold and cfg.threshold_floor == "one":
      return top_k_mask(score_BxW, eligible_BxW, 1) | above_BxW
    if cfg.alg_temp:
      gumbel_BxL = jax.random.gumbel(jax.random.fold_in(step_rng, 2), (b, cfg.gen_length))
      score_BxW = score_BxW / cfg.alg_temp + _window(gumbel_BxL, w0, width)
  if cfg.schedule == "dream":
    masks_Bx1 = eligible_BxW.sum(-1, keepdims=True)
    ratio = jnp.asarray(dream_ratios(cfg))[s]
    k_Bx1 = jnp.floor(masks_Bx1.astype(jnp.float32) * ratio).astype(jnp.int32)
  else:
    k_Bx1 = jnp.asarray(commit_schedule(cfg))[s]
  chosen_BxW = top_k_mask(score_BxW, eligible_BxW, k_Bx1)
  if cfg.threshold:  # threshold_floor "schedule": the schedule's count, and every confident one
    chosen_BxW = chosen_BxW | above_BxW
  return chosen_BxW


def _active(carry: Carry, block, cfg: SamplerConfig, mask_id: int) -> jax.Array:
  """Rows with a MASK left in this block or before it (the ones a step of this block computes for)."""
  completion_BxL = carry.tokens_BxT[:, -cfg.gen_length :]
  upto_L = jnp.arange(cfg.gen_length) < (block + 1) * cfg.block_length
  return ((completion_BxL == mask_id) & upto_L[None, :]).any(-1)


def fill_finished(carry: Carry, cfg: SamplerConfig, mask_id: int, eos_id: int) -> Carry:
  """`stop_at_eos`: a row whose first EOS and everything before it are committed is finished; its
  remaining MASKs become EOS (recorded at the current step, log-probability 0: nothing was drawn)."""
  length = cfg.gen_length
  completion_BxL = carry.tokens_BxT[:, -length:]
  is_eos_BxL = completion_BxL == eos_id
  first_B = jnp.where(is_eos_BxL.any(-1), jnp.argmax(is_eos_BxL, -1), length)
  before_BxL = jnp.arange(length)[None, :] < first_B[:, None]
  done_B = is_eos_BxL.any(-1) & ~((completion_BxL == mask_id) & before_BxL).any(-1)
  fill_BxL = done_B[:, None] & (completion_BxL == mask_id)
  return carry._replace(
    tokens_BxT=carry.tokens_BxT.at[:, -length:].set(jnp.where(fill_BxL, eos_id, completion_BxL)),
    commit_step_BxL=jnp.where(fill_BxL, carry.step, carry.commit_step_BxL),
    logp_BxL=jnp.where(fill_BxL, 0.0, carry.logp_BxL),
  )


def _generate_rows(params, prompt_BxP, prompt_valid_BxP, rng, *, model, cfg: SamplerConfig):
  p = prompt_BxP.shape[1]
  mask_id = model.cfg.mask_token_id
  tokens_BxT, valid_BxT, prompt_BxT = prepare(prompt_BxP, prompt_valid_BxP, cfg, mask_id)
  step = functools.partial(
    denoise_step,
    params=params,
    valid_BxT=valid_BxT,
    prompt_BxT=prompt_BxT,
    rng=rng,
    model=model,
    cfg=cfg,
  )
  b, length, bl = tokens_BxT.shape[0], cfg.gen_length, cfg.block_length
  cache_kv = None
  if (
    cfg.cache != "none"
  ):  # a buffer of the full pass's keys and values, filled at each block's start
    _, kv_shapes = jax.eval_shape(
      lambda: completion_logits(
        model, params, tokens_BxT, valid_BxT, p, cfg, prompt_BxT, return_kv=True
      )
    )
    cache_kv = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), kv_shapes)
  carry = Carry(
    tokens_BxT,
    jnp.full((b, length), -1, jnp.int32),
    jnp.zeros((b, length), jnp.float32),
    jnp.zeros((b,), jnp.int32),
    jnp.zeros((), jnp.int32),
    cache_kv,
  )

  def run_block(block, carry, width):
    def cond(state):
      s, c = state
      return (s < cfg.steps_bound_per_block) & _active(c, block, cfg, mask_id).any()

    def body(state):
      s, c = state
      c = step(c, block, s, width=width)
      if cfg.stop_at_eos:
        c = fill_finished(c, cfg, mask_id, model.cfg.eos_token_id)
      return s + 1, c

    if cfg.exact:  # LLaDA's loop: a fixed number of steps, nothing to test between them
      return jax.lax.fori_loop(
        0, cfg.steps_per_block, lambda s, c: step(c, block, s, width=width), carry
      )
    return jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), carry))[1]

  if cfg.cache == "prefix":  # the computed width shrinks block by block: one loop body per block
    for block in range(cfg.num_blocks):
      carry = run_block(block, carry, length - block * bl)
  else:
    width = length if cfg.cache == "none" else bl
    carry = jax.lax.fori_loop(0, cfg.num_blocks, lambda i, c: run_block(i, c, width), carry)
  return Generation(carry.tokens_BxT[:, p:], carry.commit_step_BxL, carry.logp_BxL, carry.nfe_B)


def generate(
  params,
  prompt_BxP: jax.Array,
  prompt_valid_BxP: jax.Array,
  rng: jax.Array,
  *,
  model: nn.Module,
  cfg: SamplerConfig,
) -> Generation:
  """The `Generation` of a batch: the tokens, the step that committed each, its log-probability
  under the distribution it was drawn from at that step (`committed_log_probs`: at temperature T,
  `log softmax(logits / T)`), and the model evaluations per row. With `random` remasking the order of
  the commits does not depend on the model, and `logp_BxL.sum(-1)` is the log-probability of the
  rollout's path up to that order's probability. (A sampled MASK id stays eligible, as in LLaDA, and is
  committed again later; only the last commit of a position is recorded.)

  With `micro_batch` (dividing B), the rows run in B / micro_batch passes of a `lax.map`; row r is in
  pass r mod (B / micro_batch), so every pass spans the batch's shards, and pass j draws from
  `fold_in(rng, j)`."""
  rows = functools.partial(_generate_rows, model=model, cfg=cfg)
  b = prompt_BxP.shape[0]
  mb = cfg.micro_batch
  if not mb or mb >= b:
    return rows(params, prompt_BxP, prompt_valid_BxP, rng)
  if b % mb:
    raise ValueError(f"sampler micro_batch {mb} does not divide the batch of {b} rows")
  passes = b // mb

  def split(x):  # [B, ...] -> [passes, mb, ...], row r = i * passes + j in pass j
    return jnp.swapaxes(x.reshape(mb, passes, *x.shape[1:]), 0, 1)

  def one(args):
    j, prompt, valid = args
    return rows(params, prompt, valid, jax.random.fold_in(rng, j))

  out = jax.lax.map(one, (jnp.arange(passes), split(prompt_BxP), split(prompt_valid_BxP)))
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(b, *x.shape[2:]), out)


def make_generate_fn(model: nn.Module, cfg: SamplerConfig, mesh, rules, param_shardings):
  """`(params, prompt_BxP, prompt_valid_BxP, rng) -> Generation`, jitted once per prompt shape with
  the batch sharded on the data axes and parameters as in training."""
  batch = sharding.batch_sharding(mesh, rules)
  fn = jax.jit(
    functools.partial(generate, model=model, cfg=cfg),
    in_shardings=(param_shardings, batch, batch, sharding.replicated(mesh)),
    out_shardings=Generation(batch, batch, batch, sharding.batch_sharding(mesh, rules, ndim=1)),
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
