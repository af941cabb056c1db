"""Sampler semantics against LLaDA's generation, written out as a plain Python loop."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import common
from trafl_jax import model as model_lib
from trafl_jax import sampler, sharding
from trafl_jax import state as state_lib

from .conftest import small_model_config

CFG = small_model_config(vocab_size=48)
MODEL = model_lib.Transformer(CFG)
SAMPLE = sampler.SamplerConfig(gen_length=24, steps=9, block_length=8, temperature=0.0)


@pytest.fixture(scope="module")
def params():
  p = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), bool))
  # Larger weights make the random model's distributions peaked, so greedy choices are not near-ties.
  return jax.tree.map(lambda x: x * 4.0, nn.unbox(p["params"]))


def _prompts(batch=4, prompt_len=6, seed=1):
  rng = np.random.default_rng(seed)
  return rng.integers(5, CFG.vocab_size, (batch, prompt_len)).astype(np.int32), np.ones(
    (batch, prompt_len), bool
  )


def llada_schedule(block_mask_num, steps):
  """LLaDA's get_num_transfer_tokens for one row."""
  base, remainder = block_mask_num // steps, block_mask_num % steps
  out = [base] * steps
  for i in range(remainder):
    out[i] += 1
  return out


@pytest.mark.parametrize("gen,block,steps", [(24, 8, 9), (96, 32, 15), (64, 64, 7), (32, 8, 32)])
def test_commit_schedule_equals_llada(gen, block, steps):
  cfg = sampler.SamplerConfig(gen_length=gen, steps=steps, block_length=block)
  want = []
  for _ in range(gen // block):
    want += llada_schedule(block, steps // (gen // block))
  np.testing.assert_array_equal(sampler.commit_schedule(cfg), want)
  assert sampler.commit_schedule(cfg).sum() == gen


def test_bad_sampler_settings_are_named():
  with pytest.raises(ValueError, match="block_length"):
    sampler.SamplerConfig(gen_length=30, block_length=8)
  with pytest.raises(ValueError, match="split evenly"):
    sampler.SamplerConfig(gen_length=32, block_length=8, steps=6)
  with pytest.raises(ValueError, match="remasking"):
    sampler.SamplerConfig(remasking="highest_entropy")


def reference_generate(params, prompt, cfg, rng_uniform=None):
  """LLaDA's `generate`, step by step in NumPy over the same model (greedy, or random remasking)."""
  forward = jax.jit(lambda p, x, v: MODEL.apply({"params": p}, x, v))
  b, plen = prompt.shape
  x = np.concatenate([prompt, np.full((b, cfg.gen_length), CFG.mask_token_id)], axis=1)
  prompt_index = np.zeros_like(x, bool)
  prompt_index[:, :plen] = True
  commit_step = np.full((b, cfg.gen_length), -1)
  spb = cfg.steps // cfg.num_blocks
  step = 0
  for block in range(cfg.num_blocks):
    lo, hi = plen + block * cfg.block_length, plen + (block + 1) * cfg.block_length
    counts = llada_schedule(int((x[0, lo:hi] == CFG.mask_token_id).sum()), spb)
    for i in range(spb):
      mask_index = x == CFG.mask_token_id
      valid = np.ones_like(x, bool)
      if cfg.cfg_scale > 0:
        un_x = np.where(prompt_index, CFG.mask_token_id, x)
        logits = np.asarray(forward(params, np.concatenate([x, un_x]), np.concatenate([valid] * 2)))
        cond, uncond = logits[:b], logits[b:]
        logits = uncond + (cfg.cfg_scale + 1) * (cond - uncond)
      else:
        logits = np.asarray(forward(params, x, valid))
      x0 = logits.argmax(-1)
      if cfg.remasking == "low_confidence":
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x0_p = np.take_along_axis(probs, x0[..., None], -1)[..., 0]
      else:
        x0_p = np.concatenate([np.zeros((b, plen)), rng_uniform(step)], axis=1)
      x0_p[:, hi:] = -np.inf
      x0 = np.where(mask_index, x0, x)
      confidence = np.where(mask_index, x0_p, -np.inf)
      before = x.copy()
      for j in range(b):
        select = np.argsort(-confidence[j], kind="stable")[: counts[i]]
        x[j, select] = x0[j, select]
        commit_step[j, select - plen] = step
      # Committed tokens never change.
      committed = before != CFG.mask_token_id
      np.testing.assert_array_equal(x[committed], before[committed])
      step += 1
  return x[:, plen:], commit_step


def test_greedy_matches_reference_loop_and_is_deterministic(params):
  prompt, valid = _prompts()
  gen = jax.jit(functools.partial(sampler.generate, model=MODEL, cfg=SAMPLE))
  tokens, steps, _ = gen(params, prompt, valid, jax.random.PRNGKey(0))[:3]
  tokens2 = gen(params, prompt, valid, jax.random.PRNGKey(1)).completion_BxL  # rng unused: greedy
  want_tokens, want_steps = reference_generate(params, prompt, SAMPLE)
  np.testing.assert_array_equal(tokens, want_tokens)
  np.testing.assert_array_equal(steps, want_steps)
  np.testing.assert_array_equal(tokens, tokens2)
  assert len(np.unique(np.asarray(tokens))) > 3  # not a degenerate constant output


def test_cfg_matches_reference_loop(params):
  prompt, valid = _prompts(batch=2)
  cfg = sampler.SamplerConfig(gen_length=16, steps=8, block_length=8, cfg_scale=1.5)
  tokens, steps, _ = jax.jit(functools.partial(sampler.generate, model=MODEL, cfg=cfg))(
    params, prompt, valid, jax.random.PRNGKey(0)
  )[:3]
  want_tokens, want_steps = reference_generate(params, prompt, cfg)
  np.testing.assert_array_equal(tokens, want_tokens)
  np.testing.assert_array_equal(steps, want_steps)


def test_random_remasking_matches_reference_with_the_same_draws(params):
  prompt, valid = _prompts(batch=3)
  cfg = sampler.SamplerConfig(gen_length=16, steps=8, block_length=8, remasking="random")
  rng = jax.random.PRNGKey(7)
  draws = lambda i: np.asarray(
    jax.random.uniform(jax.random.fold_in(jax.random.fold_in(rng, i), 1), (3, 16))
  )
  tokens, steps, _ = jax.jit(functools.partial(sampler.generate, model=MODEL, cfg=cfg))(
    params, prompt, valid, rng
  )[:3]
  want_tokens, want_steps = reference_generate(params, prompt, cfg, rng_uniform=draws)
  np.testing.assert_array_equal(tokens, want_tokens)
  np.testing.assert_array_equal(steps, want_steps)


def test_committed_tokens_never_change_and_blocks_are_respected(params):
  prompt, valid = _prompts()
  cfg = sampler.SamplerConfig(gen_length=24, steps=12, block_length=8, temperature=1.0)
  rng = jax.random.PRNGKey(3)
  tokens, valid_t, prompt_t = sampler.prepare(prompt, valid, cfg, CFG.mask_token_id)
  step_fn = jax.jit(
    functools.partial(
      sampler.denoise_step,
      width=cfg.gen_length,
      params=params,
      valid_BxT=valid_t,
      prompt_BxT=prompt_t,
      rng=rng,
      model=MODEL,
      cfg=cfg,
    )
  )
  carry = sampler.Carry(
    tokens,
    jnp.full((4, 24), -1, jnp.int32),
    jnp.zeros((4, 24), jnp.float32),
    jnp.zeros((4,), jnp.int32),
    jnp.zeros((), jnp.int32),
    None,
  )
  schedule = sampler.commit_schedule(cfg)
  for i in range(cfg.steps):
    before = np.asarray(carry.tokens_BxT[:, 6:])
    carry = step_fn(carry, i // cfg.steps_per_block, i % cfg.steps_per_block)
    tokens, commit, logp = carry.tokens_BxT, carry.commit_step_BxL, carry.logp_BxL
    after = np.asarray(tokens[:, 6:])
    done = before != CFG.mask_token_id
    np.testing.assert_array_equal(after[done], before[done])
    newly = np.asarray(commit) == i
    assert (newly.sum(1) == schedule[i]).all()
    block = i // cfg.steps_per_block
    cols = np.nonzero(newly.any(0))[0]
    assert cols.min() >= block * 8 and cols.max() < (block + 1) * 8  # only the current block
  # Stepping by hand is what the jitted fori_loop does.
  full_tokens, full_commit, full_logp = sampler.generate(
    params, prompt, valid, rng, model=MODEL, cfg=cfg
  )[:3]
  np.testing.assert_array_equal(full_tokens, tokens[:, 6:])
  np.testing.assert_array_equal(full_commit, commit)
  np.testing.assert_allclose(full_logp, logp, rtol=1e-6)
  assert (np.asarray(full_commit) >= 0).all()


def test_temperature_sampling_is_seeded(params):
  prompt, valid = _prompts()
  cfg = sampler.SamplerConfig(gen_length=16, steps=8, block_length=8, temperature=1.0)
  gen = jax.jit(functools.partial(sampler.generate, model=MODEL, cfg=cfg))
  a, _, _ = gen(params, prompt, valid, jax.random.PRNGKey(0))[:3]
  b, _, _ = gen(params, prompt, valid, jax.random.PRNGKey(0))[:3]
  c, _, _ = gen(params, prompt, valid, jax.random.PRNGKey(1))[:3]
  np.testing.assert_array_equal(a, b)
  assert (np.asarray(a) != np.asarray(c)).any()


def test_left_padding_does_not_change_results(params):
  prompt, valid = _prompts(batch=3, prompt_len=6)
  gen = jax.jit(functools.partial(sampler.generate, model=MODEL, cfg=SAMPLE))
  alone, alone_steps, _ = gen(params, prompt, valid, jax.random.PRNGKey(0))[:3]
  # The same prompts behind 5 pad positions holding arbitrary ids, and a shorter prompt in the batch.
  rng = np.random.default_rng(0)
  padded = np.concatenate([rng.integers(0, CFG.vocab_size, (3, 5)), prompt], axis=1).astype(
    np.int32
  )
  padded_valid = np.concatenate([np.zeros((3, 5), bool), valid], axis=1)
  padded[2, :8] = CFG.pad_token_id  # row 2: a 3-token prompt
  padded_valid[2, :8] = False
  out, out_steps, _ = gen(params, padded, padded_valid, jax.random.PRNGKey(0))[:3]
  np.testing.assert_array_equal(out[:2], alone[:2])
  np.testing.assert_array_equal(out_steps[:2], alone_steps[:2])
  short, _, _ = gen(params, prompt[2:, 3:], valid[2:, 3:], jax.random.PRNGKey(0))[:3]
  np.testing.assert_array_equal(out[2:], short)


def test_sharded_equals_unsharded(params):
  mesh = sharding.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})
  rules = sharding.rules_from_config(common.sharding_rules().to_dict())
  tx = state_lib.make_optimizer(
    state_lib.OptimConfig(1e-3, "constant", 0, 0.1, 0.0, 0.9, 0.99, 1e-8, 1.0, 10)
  )
  specs, _ = state_lib.logical_specs(MODEL, tx, 8)
  shardings = sharding.logical_to_shardings(specs.params, mesh, rules)
  sharded_params = jax.device_put(params, shardings)
  prompt, valid = _prompts(batch=8)
  run = sampler.make_generate_fn(MODEL, SAMPLE, mesh, rules, shardings)
  tokens, steps, _ = run(sharded_params, prompt, valid, jax.random.PRNGKey(0))[:3]
  assert len(tokens.sharding.device_set) == 8
  want, want_steps, _ = jax.jit(functools.partial(sampler.generate, model=MODEL, cfg=SAMPLE))(
    params, prompt, valid, jax.random.PRNGKey(0)
  )[:3]
  np.testing.assert_array_equal(tokens, want)
  np.testing.assert_array_equal(steps, want_steps)


@jax.jit
def _exp_logit_minus_logsumexp(logits_BxLxV, tokens_BxL):
  """The confidence the sampler used to compute, kept here to show the near-tie it got wrong."""
  chosen_BxL = jnp.take_along_axis(logits_BxLxV, tokens_BxL[..., None], axis=-1)[..., 0]
  return jnp.exp(chosen_BxL - jax.nn.logsumexp(logits_BxLxV, axis=-1))


def _near_tie_logits():
  """Logits (1x2xV) for two positions whose argmax is token 0 and whose confidences differ by a few
  parts in 1e7: position 1 has a runner-up logit a few float32 ulps lower, so it is the more confident,
  yet `exp(logit - logsumexp)` rounds the two confidences to the same float32."""
  base_V = np.array([20.0, 19.5, 19.0, 18.0, 17.0, 16.0, 15.0, 14.0], np.float32)
  tokens_BxL = np.zeros((1, 2), np.int32)
  for ulps in range(1, 64):
    lowered_V = base_V.copy()
    lowered_V[1] -= np.float32(ulps) * np.spacing(base_V[1])
    logits_BxLxV = np.stack([base_V, lowered_V])[None]
    old_BxL = np.asarray(_exp_logit_minus_logsumexp(logits_BxLxV, tokens_BxL))
    if old_BxL[0, 0] == old_BxL[0, 1]:
      return logits_BxLxV
  raise AssertionError("no float32 near-tie found")


def test_confidence_is_the_softmax_probability_and_separates_a_near_tie():
  logits_BxLxV = _near_tie_logits()
  tokens_BxL = np.zeros((1, 2), np.int32)
  exact_64 = np.exp(logits_BxLxV.astype(np.float64))
  exact_64 = (exact_64[..., 0] / exact_64.sum(-1))[0]
  assert exact_64[1] > exact_64[0] and exact_64[1] / exact_64[0] - 1 < 2e-6
  # The defect: the old score ties, and the stable top-k then commits the less confident position 0.
  old_BxL = np.asarray(_exp_logit_minus_logsumexp(logits_BxLxV, tokens_BxL))
  assert old_BxL[0, 0] == old_BxL[0, 1]
  eligible_BxL = np.ones((1, 2), bool)
  np.testing.assert_array_equal(sampler.top_k_mask(old_BxL, eligible_BxL, 1), [[True, False]])
  # The softmax probability keeps them apart, in the right order, and commits position 1.
  confidence_BxL = np.asarray(jax.jit(sampler.chosen_probability)(logits_BxLxV, tokens_BxL))
  assert confidence_BxL[0, 1] > confidence_BxL[0, 0]
  np.testing.assert_allclose(confidence_BxL[0], exact_64, rtol=2e-7)
  np.testing.assert_array_equal(
    sampler.top_k_mask(confidence_BxL, eligible_BxL, 1), [[False, True]]
  )


def test_confidence_equals_softmax_then_gather():
  logits_BxLxV = 5.0 * jax.random.normal(jax.random.PRNGKey(0), (3, 16, 200))
  # Logits are arguments, not closed-over constants, which XLA would fold with other arithmetic.
  softmax = jax.jit(
    lambda l_BxLxV, t_BxL: jnp.take_along_axis(
      jax.nn.softmax(l_BxLxV, axis=-1), t_BxL[..., None], axis=-1
    )[..., 0]
  )
  fn = jax.jit(sampler.chosen_probability)
  greedy_BxL = jnp.argmax(logits_BxLxV, axis=-1)
  # Bit for bit on the greedy tokens; within a float32 rounding on any others (sampled at T > 0).
  np.testing.assert_array_equal(fn(logits_BxLxV, greedy_BxL), softmax(logits_BxLxV, greedy_BxL))
  any_BxL = jax.random.randint(jax.random.PRNGKey(1), (3, 16), 0, 200)
  np.testing.assert_allclose(fn(logits_BxLxV, any_BxL), softmax(logits_BxLxV, any_BxL), rtol=3e-7)


class _LogitsAsParams:
  """A stand-in model whose completion logits are its parameters (the same at every step, whatever
  the tokens); as a jit argument they are not constants XLA could fold with other arithmetic."""

  def __init__(self, mask_token_id):
    self.cfg = types.SimpleNamespace(mask_token_id=mask_token_id)

  def apply(self, variables, tokens_BxT, valid_BxT, logits_from=0, return_kv=False):
    del valid_BxT, logits_from, return_kv
    logits_LxV = variables["params"]
    return jnp.broadcast_to(logits_LxV, (tokens_BxT.shape[0], *logits_LxV.shape))


def test_sampler_commits_the_more_confident_of_a_near_tie():
  logits_BxLxV = _near_tie_logits()
  stub = _LogitsAsParams(mask_token_id=logits_BxLxV.shape[-1] - 1)
  cfg = sampler.SamplerConfig(gen_length=2, steps=2, block_length=2)
  tokens_BxL, commit_step_BxL, _ = jax.jit(
    functools.partial(sampler.generate, model=stub, cfg=cfg)
  )(logits_BxLxV[0], np.full((1, 3), 5, np.int32), np.ones((1, 3), bool), jax.random.PRNGKey(0))[:3]
  np.testing.assert_array_equal(tokens_BxL, [[0, 0]])
  # One token a step: position 1 (the more confident) first, as LLaDA's softmax-then-gather orders them.
  np.testing.assert_array_equal(commit_step_BxL, [[1, 0]])


def test_completion_lengths_count_through_the_first_eos():
  eos = CFG.eos_token_id
  completion = np.array([[7, 8, eos, eos, 9], [7, 8, 9, 10, 11], [eos, 5, eos, 6, 6]])
  np.testing.assert_array_equal(sampler.completion_lengths(completion, eos), [3, 5, 1])
