"""The sampler's fast modes (prefix and dual caches, the confidence threshold, stop_at_eos,
micro-batches) against the exact sampler and against loops written out by hand."""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import common
from trafl_jax import model as model_lib
from trafl_jax import sampler, sharding
from trafl_jax import state as state_lib

from .conftest import FAMILIES, family_config, small_model_config

CFG = small_model_config(vocab_size=48)  # the special ids and vocabulary both families share
BASE = dict(gen_length=24, steps=12, block_length=8, temperature=0.0)


class Family(NamedTuple):
  model: model_lib.Transformer
  params: dict


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
  """Every test runs on a LLaDA-shaped and a Dream-shaped (shifted) model."""
  model = model_lib.Transformer(family_config(request.param, vocab_size=48))
  p = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), bool))
  # Larger weights make the random model's distributions peaked, so greedy choices are not near-ties.
  return Family(model, jax.tree.map(lambda x: x * 4.0, nn.unbox(p["params"])))


def _prompts(batch=4, prompt_len=6, seed=1):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(5, CFG.vocab_size, (batch, prompt_len)).astype(np.int32)
  valid = np.ones((batch, prompt_len), bool)
  valid[0, :2] = False  # one left-padded row
  return prompt, valid


def _generate(fam, prompt, valid, seed=3, **settings):
  cfg = sampler.SamplerConfig(**{**BASE, **settings})
  fn = jax.jit(functools.partial(sampler.generate, model=fam.model, cfg=cfg))
  return jax.tree.map(np.asarray, fn(fam.params, prompt, valid, jax.random.PRNGKey(seed)))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scan_layers", [True, False])
def test_a_fresh_cache_gives_the_full_pass_logits(scan_layers, family):
  """The model's cached path: positions start..start+S-1 computed over the other positions' cached
  keys and values equal the full pass when the cache is of the same tokens, and differ when stale.
  (A shifted model's first computed position predicts from its own state: compared from the next.)"""
  cfg = family_config(family, vocab_size=48, scan_layers=scan_layers)
  model = model_lib.Transformer(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 20), 5, 48)
  valid = jnp.ones((3, 20), bool).at[0, :3].set(False)
  p = nn.unbox(model.init(jax.random.PRNGKey(0), tokens, valid)["params"])
  apply = functools.partial(model.apply, {"params": p})
  stale_logits, stale_kv = apply(tokens, valid, return_kv=True)
  assert stale_kv[0].shape == (cfg.n_layers, 3, 20, cfg.n_kv_heads, cfg.head_dim)
  np.testing.assert_allclose(stale_logits, apply(tokens, valid), atol=1e-6)
  changed = tokens.at[:, 12:15].set(cfg.mask_token_id)
  want = apply(changed, valid)[:, 10:16]
  _, fresh_kv = apply(changed, valid, return_kv=True)
  got = apply(changed[:, 10:16], valid, cache_kv=fresh_kv, start=jnp.int32(10))
  first = int(cfg.shift_logits)
  np.testing.assert_allclose(got[:, first:], want[:, first:], atol=2e-5)
  stale = apply(changed[:, 10:16], valid, cache_kv=stale_kv, start=10)
  assert (
    np.abs(stale - want)[:, first:].max() > 1e-3
  )  # the other positions' keys are the old tokens'


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize(
  # Sampled runs with one block: cached modes draw the noise of the positions they compute.
  "extra",
  [{}, {"remasking": "random"}, {"cfg_scale": 1.5}, {"temperature": 1.0, "block_length": 24}],
)
def test_a_cache_refreshed_every_step_is_the_exact_sampler(fam, cache, extra):
  prompt, valid = _prompts()
  exact = _generate(fam, prompt, valid, **extra)
  fast = _generate(fam, prompt, valid, cache=cache, refresh_every=1, **extra)
  # A row that sampled the MASK id: the exact sampler decodes it again in a later block, a cached one
  # does not look back (documented); the rows that never did are compared.
  rows = ~(exact.completion_BxL == CFG.mask_token_id).any(1)
  assert rows.sum() >= 2
  np.testing.assert_array_equal(fast.completion_BxL[rows], exact.completion_BxL[rows])
  np.testing.assert_array_equal(fast.commit_step_BxL[rows], exact.commit_step_BxL[rows])
  np.testing.assert_allclose(fast.logp_BxL[rows], exact.logp_BxL[rows], atol=1e-5)
  np.testing.assert_array_equal(fast.nfe_B[rows], exact.nfe_B[rows])


def _cached_loop(fam, prompt, valid, cfg: sampler.SamplerConfig):
  """Fast-dLLM's cached generation for one greedy low-confidence run, step by step in NumPy: a full
  pass at each block's start (its logits serve the first step; its keys and values the cache), then
  only the block (dual) or the block and what follows (prefix) over the cache. A shifted model also
  computes the position before the block, whose state predicts the block's first position."""
  apply = jax.jit(
    functools.partial(fam.model.apply, {"params": fam.params}), static_argnames="return_kv"
  )
  shift = int(fam.model.cfg.shift_logits)
  b, p = prompt.shape
  x = np.concatenate([prompt, np.full((b, cfg.gen_length), CFG.mask_token_id)], 1).astype(np.int32)
  full_valid = np.concatenate([valid, np.ones((b, cfg.gen_length), bool)], 1)
  schedule = sampler.commit_schedule(cfg)
  for block in range(cfg.num_blocks):
    lo, hi = p + block * cfg.block_length, p + (block + 1) * cfg.block_length
    end = hi if cfg.cache == "dual" else p + cfg.gen_length
    for s in range(cfg.steps_per_block):
      if s == 0:
        logits, kv = apply(x, full_valid, return_kv=True)
        logits = np.asarray(logits)[:, lo:end]
      else:
        window = x[:, lo - shift : end]
        logits = np.asarray(apply(window, full_valid, cache_kv=kv, start=lo - shift))[:, shift:]
      probs = np.asarray(jax.nn.softmax(logits, -1))
      tokens = probs.argmax(-1)
      confidence = np.take_along_axis(probs, tokens[..., None], -1)[..., 0]
      eligible = x[:, lo:end] == CFG.mask_token_id
      eligible[:, hi - lo :] = False
      confidence = np.where(eligible, confidence, -np.inf)
      k = schedule[block * cfg.steps_per_block + s]
      for row in range(b):
        chosen = np.argsort(-confidence[row], kind="stable")[:k]
        x[row, lo + chosen] = tokens[row, chosen]
  return x[:, p:]


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_modes_equal_the_cached_loop_written_out(fam, cache):
  prompt, valid = _prompts()
  cfg = sampler.SamplerConfig(**BASE, cache=cache)
  got = _generate(fam, prompt, valid, cache=cache)
  want = _cached_loop(fam, prompt, valid, cfg)
  np.testing.assert_array_equal(got.completion_BxL, want)
  exact = _generate(fam, prompt, valid)
  assert (got.completion_BxL != exact.completion_BxL).any()  # the stale cache is used
  np.testing.assert_array_equal(got.nfe_B, exact.nfe_B)  # one evaluation per step, as exact


def test_a_threshold_nothing_passes_commits_one_token_per_step(fam):
  prompt, valid = _prompts()
  one_a_step = _generate(fam, prompt, valid, threshold=1.0)
  exact = _generate(fam, prompt, valid, steps=BASE["gen_length"])
  np.testing.assert_array_equal(one_a_step.completion_BxL, exact.completion_BxL)
  np.testing.assert_array_equal(one_a_step.commit_step_BxL, exact.commit_step_BxL)
  np.testing.assert_array_equal(one_a_step.nfe_B, [BASE["gen_length"]] * 4)


def test_a_threshold_commits_every_confident_position_and_takes_fewer_steps(fam):
  prompt, valid = _prompts(batch=8)
  out = _generate(fam, prompt, valid, threshold=0.3)
  steps, mask = out.commit_step_BxL, out.completion_BxL == CFG.mask_token_id
  # Greedy: the recorded log-probability is the confidence. Per step, every position committed
  # passed the threshold but the one most confident (committed when nothing passes).
  below = np.exp(out.logp_BxL) <= 0.3
  for row in range(8):
    assert np.bincount(steps[row][below[row]], minlength=1).max() <= 1
  # A row whose positions never sampled the MASK id (which stays eligible, as in LLaDA): everything
  # committed, in block order, each of its model evaluations committing (steps count the batch's:
  # a row that finished its block waits for the others).
  clean = ~mask.any(1)
  assert clean.sum() >= 6
  for row in np.nonzero(clean)[0]:
    used = np.unique(steps[row])
    assert used[0] == 0 and (steps[row] >= 0).all()
    blocks = steps[row].reshape(3, 8)
    assert (blocks[:-1].max(1) < blocks[1:].min(1)).all()
    assert out.nfe_B[row] == used.size
  assert out.nfe_B[clean].mean() < BASE["gen_length"] - 4  # steps commit several tokens


def test_a_schedule_floor_is_the_exact_sampler_when_nothing_passes(fam):
  prompt, valid = _prompts()
  floored = _generate(fam, prompt, valid, threshold=1.0, threshold_floor="schedule")
  exact = _generate(fam, prompt, valid)
  for field in ("completion_BxL", "commit_step_BxL", "logp_BxL", "nfe_B"):
    np.testing.assert_array_equal(getattr(floored, field), getattr(exact, field))


def test_a_schedule_floor_commits_the_schedule_and_every_confident_position():
  # Confidence p of the sampled token 0 at each of 8 positions (logits log p, log(1 - p)).
  p_BxW = np.array(
    [[0.95, 0.2, 0.6, 0.5, 0.1, 0.3, 0.55, 0.4], [0.95, 0.93, 0.2, 0.91, 0.1, 0.3, 0.5, 0.4]]
  )
  logits_BxWxV = jnp.asarray(np.log(np.stack([p_BxW, 1 - p_BxW], -1)), jnp.float32)
  sampled_BxW = jnp.zeros((2, 8), jnp.int32)
  eligible_BxW = jnp.asarray(np.arange(8) != 2)[None, :].repeat(2, 0)  # position 2 is committed

  def chosen(floor):
    cfg = sampler.SamplerConfig(**BASE, threshold=0.9, threshold_floor=floor)  # 2 per step
    rng = jax.random.PRNGKey(0)
    out = sampler._choose(logits_BxWxV, logits_BxWxV, sampled_BxW, eligible_BxW, 0, rng, 0, cfg)
    return [np.nonzero(row)[0].tolist() for row in np.asarray(out)]

  assert chosen("one") == [[0], [0, 1, 3]]  # above 0.9, at least the most confident
  assert chosen("schedule") == [[0, 6], [0, 1, 3]]  # the schedule's 2 most confident at least


def test_a_schedule_floor_never_takes_more_steps_than_the_schedule(fam):
  prompt, valid = _prompts(batch=8)
  out = _generate(fam, prompt, valid, threshold=0.3, threshold_floor="schedule")
  below = np.exp(out.logp_BxL) <= 0.3  # greedy: the recorded log-probability is the confidence
  per_step = sampler.commit_schedule(sampler.SamplerConfig(**BASE))[0]
  for row in range(8):  # a step commits at most the schedule's count below the threshold
    assert np.bincount(out.commit_step_BxL[row][below[row]], minlength=1).max() <= per_step
  assert (out.nfe_B <= BASE["steps"]).all() and out.nfe_B.mean() < BASE["steps"]


def _first_eos(row):
  hits = np.nonzero(row == CFG.eos_token_id)[0]
  return hits[0] if hits.size else None


@pytest.mark.parametrize("mode", [{}, {"cache": "dual", "threshold": 0.6}])
def test_stop_at_eos_keeps_every_token_before_the_first_eos(fam, mode):
  prompt, valid = _prompts(batch=16, seed=4)
  finished_early = 0
  for seed in range(3):
    full = _generate(fam, prompt, valid, seed=seed, temperature=1.0, block_length=4, **mode)
    stop = _generate(
      fam, prompt, valid, seed=seed, temperature=1.0, block_length=4, stop_at_eos=True, **mode
    )
    for row in range(16):
      first = _first_eos(stop.completion_BxL[row])
      mask = stop.completion_BxL[row] == CFG.mask_token_id  # a sampled MASK id never re-decoded
      if first is None or mask[:first].any():  # never finished: the same tokens
        np.testing.assert_array_equal(stop.completion_BxL[row], full.completion_BxL[row])
        continue
      np.testing.assert_array_equal(
        stop.completion_BxL[row, : first + 1], full.completion_BxL[row, : first + 1]
      )
      # After it: what was committed before the row finished, or EOS filled in (log-probability 0).
      filled = (stop.completion_BxL[row] == CFG.eos_token_id) & (stop.logp_BxL[row] == 0.0)
      kept = stop.completion_BxL[row] == full.completion_BxL[row]
      assert (filled | kept).all() and not mask.any()
      assert (stop.logp_BxL[row, : first + 1] != 0.0).all()  # drawn, not filled
      finished_early += int(stop.nfe_B[row] < full.nfe_B[row])
    assert (stop.nfe_B <= full.nfe_B).all()
  assert finished_early > 0  # the test saw rows stop


def test_micro_batches_equal_the_whole_batch(fam):
  prompt, valid = _prompts(batch=8)
  whole = _generate(fam, prompt, valid, cache="dual", threshold=0.7)
  parts = _generate(fam, prompt, valid, cache="dual", threshold=0.7, micro_batch=2)
  for a, b in zip(whole, parts):  # the tokens, steps and counts equal; log-probs to float rounding
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="micro_batch 3 does not divide"):
    _generate(fam, prompt, valid, micro_batch=3)


MODES = [
  {},
  {"cache": "prefix"},
  {"cache": "dual", "threshold": 0.7, "stop_at_eos": True},
  {"cache": "dual", "refresh_every": 2, "micro_batch": 4, "temperature": 1.0},
]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_sharded_equals_one_device_and_compiles_once(fam, mode):
  mesh = sharding.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})
  rules = sharding.rules_from_config(common.sharding_rules().to_dict())
  tx = state_lib.make_optimizer(
    state_lib.OptimConfig(1e-3, "constant", 0, 0.1, 0.0, 0.9, 0.99, 1e-8, 1.0, 10)
  )
  specs, _ = state_lib.logical_specs(fam.model, tx, 8)
  shardings = sharding.logical_to_shardings(specs.params, mesh, rules)
  cfg = sampler.SamplerConfig(**{**BASE, **mode})
  run = sampler.make_generate_fn(fam.model, cfg, mesh, rules, shardings)
  sharded_params = jax.device_put(fam.params, shardings)
  for seed in range(3):  # other prompts and keys of the same shape: no new compilation
    prompt, valid = _prompts(batch=8, seed=seed)
    out = run(sharded_params, prompt, valid, jax.random.PRNGKey(seed))
    assert len(out.completion_BxL.sharding.device_set) == 8
  assert run.jitted._cache_size() == 1
  want = _generate(fam, prompt, valid, seed=2, **mode)
  for a, b in zip(out, want):
    np.testing.assert_allclose(np.asarray(a), b, atol=1e-5)


def test_bad_mode_settings_are_named():
  with pytest.raises(ValueError, match="cache 'kv'"):
    sampler.SamplerConfig(cache="kv")
  with pytest.raises(ValueError, match="needs remasking 'low_confidence'"):
    sampler.SamplerConfig(threshold=0.9, remasking="random")
  with pytest.raises(ValueError, match="threshold 1.5"):
    sampler.SamplerConfig(threshold=1.5)
  with pytest.raises(ValueError, match="refresh_every"):
    sampler.SamplerConfig(refresh_every=-1)
  assert sampler.SamplerConfig().mode == "exact" and sampler.SamplerConfig().exact
  fast = sampler.SamplerConfig(cache="dual", refresh_every=4, threshold=0.9, stop_at_eos=True)
  assert fast.mode == "dual/r4+t0.9+eos" and not fast.exact
  with pytest.raises(ValueError, match="threshold_floor 'two'"):
    sampler.SamplerConfig(threshold=0.9, threshold_floor="two")
  floored = sampler.SamplerConfig(gen_length=24, steps=12, block_length=8, threshold=0.9)
  floored = dataclasses.replace(floored, threshold_floor="schedule")
  assert floored.mode == "t0.9s" and floored.steps_bound_per_block == 4
