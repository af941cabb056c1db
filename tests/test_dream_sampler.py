"""Dream's `diffusion_generate` semantics (schedule="dream") against its loop written out in NumPy:
the `linspace(1, eps, steps + 1)` transfer counts, the confidence rules, top-p / top-k, `origin`,
`alg_temp`, and LLaDA-style blocks for Dream."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from trafl_jax import model as model_lib
from trafl_jax import sampler

from .conftest import family_config

CFG = family_config("dream", vocab_size=48)
MODEL = model_lib.Transformer(CFG)
MASK = CFG.mask_token_id


@pytest.fixture(scope="module")
def params():
  p = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), bool))
  # Larger weights make the random model's distributions peaked, so greedy choices are not near-ties;
  # the MASK id's logit is 0, below the peaked maximum, so no row draws it (Dream's batch-mean count
  # and our per-row one then agree, and every position is committed once).
  p = jax.tree.map(lambda x: x * 4.0, nn.unbox(p["params"]))
  p["ff_out"]["kernel"] = p["ff_out"]["kernel"].at[:, MASK].set(0.0)
  return p


def _prompts(batch=4, prompt_len=6, seed=1):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(5, CFG.vocab_size, (batch, prompt_len)).astype(np.int32)
  valid = np.ones((batch, prompt_len), bool)
  valid[0, :2] = False  # one left-padded row
  return prompt, valid


def _generate(params, prompt, valid, seed=3, **settings):
  cfg = sampler.SamplerConfig(**{"schedule": "dream", **settings})
  fn = jax.jit(functools.partial(sampler.generate, model=MODEL, cfg=cfg))
  return jax.tree.map(np.asarray, fn(params, prompt, valid, jax.random.PRNGKey(seed)))


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _dream_probs(logits, top_p, top_k):
  """Dream's `sample_tokens` at temperature 0: top-p, then top-k, then softmax."""
  logits = logits.astype(np.float64).copy()
  lowest = np.finfo(np.float32).min
  if top_p < 1.0:
    order = np.argsort(-logits, -1, kind="stable")
    cumulative = np.cumsum(_softmax(np.take_along_axis(logits, order, -1)), -1)
    remove = np.zeros_like(cumulative, bool)
    remove[..., 1:] = cumulative[..., :-1] > top_p
    np.put_along_axis(
      logits, order, np.where(remove, lowest, np.take_along_axis(logits, order, -1)), -1
    )
  if top_k:
    kth = np.sort(logits, -1)[..., -top_k][..., None]
    logits = np.where(logits < kth, lowest, logits)
  return _softmax(logits)


def _dream_loop(params, prompt, valid, *, gen_length, steps, alg, top_p=1.0, top_k=0, eps=1e-3):
  """Dream's generation loop for greedy confidence algorithms, step by step: every step scores all
  masked positions of the canvas and commits the `int(masks * (1 - s/t))` most confident of each
  row (all of them at the last step). Returns the tokens and the step that committed each (the
  last, for a position that drew the MASK id and was committed again)."""
  apply = jax.jit(functools.partial(MODEL.apply, {"params": params}))
  b, p = prompt.shape
  x = np.concatenate([prompt, np.full((b, gen_length), MASK)], 1).astype(np.int32)
  full_valid = np.concatenate([valid, np.ones((b, gen_length), bool)], 1)
  committed = np.full((b, gen_length), -1)
  t = sampler.dream_timesteps(steps, eps)
  for i in range(steps):
    mask = x[:, p:] == MASK
    probs = _dream_probs(np.asarray(apply(x, full_valid))[:, p:], top_p, top_k)
    tokens = probs.argmax(-1)
    if alg == "maskgit_plus":
      conf = probs.max(-1)
    elif alg == "topk_margin":
      top = np.sort(probs, -1)
      conf = top[..., -1] - top[..., -2]
    else:
      conf = (probs * np.log(probs + 1e-10)).sum(-1)
    conf = np.where(mask, conf, -np.inf)
    for row in range(b):
      # Dream takes the batch's mean count; a row that drew the MASK id has more (ours: the row's).
      n = np.float32(mask[row].sum())
      k = int(n * (np.float32(1) - t[i + 1] / t[i])) if i < steps - 1 else int(n)
      chosen = np.argsort(-conf[row], kind="stable")[:k]
      x[row, p + chosen] = tokens[row, chosen]
      committed[row, chosen] = i
  return x[:, p:], committed


def test_the_timesteps_are_torch_linspace_and_the_counts_sum_to_the_canvas():
  for steps in (1, 4, 7, 16, 33, 128):
    t = sampler.dream_timesteps(steps, 1e-3)
    assert t.dtype == np.float32 and t[0] == 1.0 and t[-1] == np.float32(1e-3)
    np.testing.assert_allclose(t, np.linspace(1, 1e-3, steps + 1), rtol=2e-6)
    # With as many steps as tokens: nothing at step 0, then one a step, the rest at the end.
    ratios = sampler.dream_ratios(
      sampler.SamplerConfig(gen_length=steps, steps=steps, block_length=steps, schedule="dream")
    )
    left, counts = steps, []
    for r in ratios:
      counts.append(int(np.floor(np.float32(left) * r)))
      left -= counts[-1]
    assert sum(counts) == steps and counts[-1] >= 1


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("steps", [24, 12, 5])
def test_greedy_dream_equals_its_loop_written_out(params, alg, steps):
  prompt, valid = _prompts()
  remasking = sampler.DREAM_ALGS[alg]
  got = _generate(
    params, prompt, valid, gen_length=24, steps=steps, block_length=24, remasking=remasking
  )
  tokens, committed = _dream_loop(params, prompt, valid, gen_length=24, steps=steps, alg=alg)
  np.testing.assert_array_equal(got.completion_BxL, tokens)
  np.testing.assert_array_equal(got.commit_step_BxL, committed)
  assert (got.nfe_B == steps).all()


@pytest.mark.parametrize("top_p,top_k", [(0.3, 0), (1.0, 2), (0.5, 3)])
def test_top_p_and_top_k_change_dream_confidences_as_its_loop_does(params, top_p, top_k):
  prompt, valid = _prompts(seed=5)
  got = _generate(
    params,
    prompt,
    valid,
    gen_length=16,
    steps=8,
    block_length=16,
    remasking="entropy",
    top_p=top_p,
    top_k=top_k,
  )
  tokens, committed = _dream_loop(
    params, prompt, valid, gen_length=16, steps=8, alg="entropy", top_p=top_p, top_k=top_k
  )
  np.testing.assert_array_equal(got.completion_BxL, tokens)
  np.testing.assert_array_equal(got.commit_step_BxL, committed)
  plain = _generate(
    params, prompt, valid, gen_length=16, steps=8, block_length=16, remasking="entropy"
  )
  assert (plain.commit_step_BxL != got.commit_step_BxL).any()  # the filter reorders the commits


def test_processed_logits_keep_dreams_top_p_and_top_k_sets():
  logits = jnp.log(jnp.array([[[0.5, 0.2, 0.15, 0.1, 0.05]]]))
  for top_p, kept in ((0.45, 1), (0.6, 2), (0.75, 3), (0.9, 4), (0.96, 5)):
    cfg = sampler.SamplerConfig(top_p=top_p)
    out = np.asarray(sampler.processed_logits(logits, cfg))[0, 0]
    assert (out > -1e30).sum() == kept, top_p
  out = np.asarray(
    sampler.processed_logits(logits * 2.0, sampler.SamplerConfig(top_k=3, temperature=2.0))
  )
  np.testing.assert_allclose(out[0, 0, :3], np.log([0.5, 0.2, 0.15]), rtol=1e-6)
  assert (out[0, 0, 3:] < -1e30).all()


def test_top_p_keeps_the_set_dreams_sort_keeps_on_random_logits():
  """The bisection threshold keeps exactly the tokens the sort-and-cumsum of Dream's `top_p_logits`
  keeps, on peaked and flat rows, negative and positive logits, at several top_p."""
  rng = np.random.default_rng(0)
  scale = np.array([0.1, 1.0, 3.0, 10.0, 30.0])[:, None, None]  # rows spanning signs and magnitudes
  logits = (
    rng.normal(size=(5, 6, 300)) * scale + np.array([-2.0, 0.0, 2.0, -40.0, 5.0])[:, None, None]
  )
  for top_p in (0.05, 0.3, 0.9, 0.999):
    got = np.asarray(
      sampler.processed_logits(jnp.asarray(logits), sampler.SamplerConfig(top_p=top_p))
    )
    want = _dream_probs(logits, top_p, 0)  # NumPy: sort, cumsum, shift right (float64)
    np.testing.assert_array_equal(got > -1e30, want > 0)


def test_a_sampled_dream_token_is_drawn_from_the_filtered_distribution(params):
  """At temperature 1 with top-k 2, every committed token is one of its step's two most likely, and
  its recorded log-probability is under the renormalized pair."""
  prompt, valid = _prompts(batch=8)
  out = _generate(
    params,
    prompt,
    valid,
    gen_length=8,
    steps=8,
    block_length=8,
    remasking="low_confidence",
    temperature=1.0,
    top_k=2,
  )
  assert (out.logp_BxL > np.log(0.5) - 1e-6).sum() > 0
  assert (out.logp_BxL <= 0).all() and (out.logp_BxL > -np.inf).all()
  # Replay the last step: its position's token is among the two most likely then.
  apply = jax.jit(functools.partial(MODEL.apply, {"params": params}))
  full = np.concatenate([prompt, out.completion_BxL], 1)
  last = out.commit_step_BxL == out.commit_step_BxL.max(1, keepdims=True)
  before = np.where(last, MASK, out.completion_BxL)
  logits = np.asarray(
    apply(
      np.concatenate([prompt, before], 1), np.concatenate([valid, np.ones_like(before, bool)], 1)
    )
  )[:, prompt.shape[1] :]
  top2 = np.argsort(-logits, -1)[..., :2]
  hit = (top2 == full[:, prompt.shape[1] :, None]).any(-1)
  assert hit[last].all()


def test_origin_reveals_each_mask_with_probability_one_minus_s_over_t(params):
  prompt, valid = _prompts(batch=16)
  steps, length = 6, 24
  cfg = sampler.SamplerConfig(
    gen_length=length, steps=steps, block_length=length, schedule="dream", remasking="origin"
  )
  ratios = sampler.dream_ratios(cfg)
  counts = np.zeros(steps)
  left = np.zeros(steps)
  for seed in range(6):
    out = _generate(
      params,
      prompt,
      valid,
      seed=seed,
      gen_length=length,
      steps=steps,
      block_length=length,
      remasking="origin",
    )
    assert (out.commit_step_BxL >= 0).all() and (out.nfe_B <= steps).all()
    for i in range(steps):
      counts[i] += (out.commit_step_BxL == i).sum()
      left[i] += (out.commit_step_BxL >= i).sum()
  # Binomial(left, ratio) per step, pooled over rows and seeds: within 4 standard deviations.
  want = left * ratios
  sd = np.sqrt(np.maximum(left * ratios * (1 - ratios), 1e-9))
  assert (np.abs(counts - want) <= 4 * sd + 1e-6).all(), (counts, want)
  assert counts[-1] > 0  # the last step reveals whatever is left


def test_alg_temp_draws_positions_and_vanishes_as_it_goes_to_zero(params):
  prompt, valid = _prompts(batch=8)
  settings = dict(gen_length=24, steps=12, block_length=24, remasking="low_confidence")
  greedy = _generate(params, prompt, valid, **settings)
  cold = _generate(params, prompt, valid, alg_temp=1e-6, **settings)
  np.testing.assert_array_equal(cold.commit_step_BxL, greedy.commit_step_BxL)
  hot = [_generate(params, prompt, valid, seed=s, alg_temp=5.0, **settings) for s in range(2)]
  assert (hot[0].commit_step_BxL != greedy.commit_step_BxL).any()
  assert (hot[0].commit_step_BxL != hot[1].commit_step_BxL).any()  # a draw, keyed by the seed
  for out in hot:  # the same counts per step as the greedy schedule
    np.testing.assert_array_equal(
      np.sort(out.commit_step_BxL, 1), np.sort(greedy.commit_step_BxL, 1)
    )


def test_dream_in_blocks_runs_its_schedule_block_by_block(params):
  prompt, valid = _prompts()
  out = _generate(
    params, prompt, valid, gen_length=24, steps=12, block_length=8, remasking="entropy"
  )
  blocks = out.commit_step_BxL.reshape(4, 3, 8)
  assert (blocks[:, :-1].max(-1) < blocks[:, 1:].min(-1)).all()  # left to right
  cfg = sampler.SamplerConfig(gen_length=24, steps=12, block_length=8, schedule="dream")
  left, want = 8, []
  for ratio in sampler.dream_ratios(cfg):  # Dream's counts over a block's 8 masks in its 4 steps
    want.append(int(np.float32(left) * ratio))
    left -= want[-1]
  for block in range(3):
    steps = out.commit_step_BxL[:, block * 8 : block * 8 + 8]
    got = [(steps == block * 4 + i).sum(1) for i in range(4)]
    np.testing.assert_array_equal(np.stack(got, 1), np.tile(want, (4, 1)))


def test_dream_caches_with_a_refresh_every_step_equal_its_exact_schedule(params):
  prompt, valid = _prompts()
  settings = dict(gen_length=24, steps=12, block_length=8, remasking="entropy")
  exact = _generate(params, prompt, valid, **settings)
  for cache in ("prefix", "dual"):
    fast = _generate(params, prompt, valid, cache=cache, refresh_every=1, **settings)
    np.testing.assert_array_equal(fast.completion_BxL, exact.completion_BxL)
    np.testing.assert_array_equal(fast.commit_step_BxL, exact.commit_step_BxL)


def test_bad_dream_settings_are_named():
  with pytest.raises(ValueError, match="needs schedule 'dream'"):
    sampler.SamplerConfig(remasking="origin")
  with pytest.raises(ValueError, match="schedule 'maskgit'"):
    sampler.SamplerConfig(schedule="maskgit")
  with pytest.raises(ValueError, match="top_p"):
    sampler.SamplerConfig(top_p=0.0)
  with pytest.raises(ValueError, match="alg_temp"):
    sampler.SamplerConfig(schedule="dream", remasking="origin", alg_temp=0.5)
  with pytest.raises(ValueError, match="eps"):
    sampler.SamplerConfig(eps=1.0)
  cfg = sampler.SamplerConfig(schedule="dream", top_p=0.95, alg_temp=0.5, remasking="entropy")
  assert cfg.draw_tag == "dream+p0.95+a0.5"
  # Dream's schedule may commit nothing at a step, so more steps than tokens is allowed there only.
  sampler.SamplerConfig(gen_length=8, block_length=8, steps=16, schedule="dream")
  with pytest.raises(ValueError, match="commit nothing"):
    sampler.SamplerConfig(gen_length=8, block_length=8, steps=16)
