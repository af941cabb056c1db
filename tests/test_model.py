"""Model behaviour: shapes, padding, RoPE/RMSNorm formulas, grouped KV heads, scan, sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from configs import common
from trafl_jax import model as model_lib
from trafl_jax import sharding
from trafl_jax import state as state_lib

from .conftest import FAMILIES, family_config, small_model_config

TINY = small_model_config(vocab_size=64)


def _init(cfg, seq_len=12, seed=0):
  return model_lib.Transformer(cfg).init(
    jax.random.PRNGKey(seed), jnp.zeros((1, seq_len), jnp.int32), jnp.ones((1, seq_len), bool)
  )["params"]


def _apply(cfg, params, tokens, valid, **kw):
  return model_lib.Transformer(cfg).apply({"params": params}, tokens, valid, **kw)


@pytest.fixture(scope="module")
def tiny_params():
  return nn.unbox(_init(TINY))


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
  """(cfg, params) of a tiny model of each family."""
  cfg = family_config(request.param, vocab_size=64)
  return cfg, nn.unbox(_init(cfg))


def test_shapes_and_dtypes(tiny_params):
  tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 12), 0, TINY.vocab_size)
  logits, hidden = _apply(TINY, tiny_params, tokens, jnp.ones((3, 12), bool), return_hidden=True)
  assert logits.shape == (3, 12, TINY.vocab_size) and logits.dtype == jnp.float32
  assert hidden.shape == (3, 12, TINY.d_model)
  assert tiny_params["blocks"]["attn"]["q_proj"]["kernel"].shape == (2, 32, 32)
  assert tiny_params["blocks"]["attn"]["k_proj"]["kernel"].shape == (2, 32, 16)
  n = sum(x.size for x in jax.tree.leaves(tiny_params))
  assert n == TINY.num_params()


def test_padding_positions_do_not_affect_other_logits(family_model):
  TINY, tiny_params = family_model
  rng = np.random.default_rng(0)
  tokens = rng.integers(5, TINY.vocab_size, (2, 12))
  valid = np.ones((2, 12), bool)
  valid[:, :4] = False  # left padding
  base = _apply(TINY, tiny_params, jnp.asarray(tokens), jnp.asarray(valid))
  tokens2 = tokens.copy()
  tokens2[:, :4] = rng.integers(0, TINY.vocab_size, (2, 4))
  other = _apply(TINY, tiny_params, jnp.asarray(tokens2), jnp.asarray(valid))
  # (Dream: the first real token's prediction is a padding position's state, which nothing reads.)
  first = 5 if TINY.shift_logits else 4
  np.testing.assert_allclose(base[:, first:], other[:, first:], atol=1e-5)
  # And left padding is invisible: RoPE is relative, so the unpadded row gives the same logits.
  unpadded = _apply(TINY, tiny_params, jnp.asarray(tokens[:, 4:]), jnp.ones((2, 8), bool))
  np.testing.assert_allclose(base[:, first:], unpadded[:, first - 4 :], atol=1e-4)
  # Sanity: changing a valid token does change other positions (attention is bidirectional).
  tokens3 = tokens.copy()
  tokens3[:, -1] = (tokens3[:, -1] + 1) % TINY.vocab_size
  changed = _apply(TINY, tiny_params, jnp.asarray(tokens3), jnp.asarray(valid))
  assert np.abs(np.asarray(changed[:, 4]) - np.asarray(base[:, 4])).max() > 1e-4


def test_rms_norm_formula():
  cfg = dataclasses.replace(TINY, rms_norm_eps=1e-5)
  x = np.random.default_rng(1).normal(size=(2, 3, 32)).astype(np.float32)
  norm = model_lib.RMSNorm(cfg)
  params = {"params": {"scale": np.linspace(0.5, 1.5, 32).astype(np.float32)}}
  out = norm.apply(params, jnp.asarray(x))
  want = params["params"]["scale"] * x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_rope_rotate_half_layout():
  x = np.random.default_rng(2).normal(size=(1, 5, 2, 8)).astype(np.float32)
  out = np.asarray(model_lib.rope(jnp.asarray(x), 500000.0))
  want = np.empty_like(x)
  for pos in range(5):
    for i in range(4):
      freq = 500000.0 ** (-2 * i / 8)
      c, s = np.cos(pos * freq), np.sin(pos * freq)
      a, b = x[0, pos, :, i], x[0, pos, :, i + 4]
      want[0, pos, :, i] = a * c - b * s
      want[0, pos, :, i + 4] = b * c + a * s
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_grouped_kv_heads_map_query_head_j_to_kv_head_j_over_group(tiny_params):
  """A GQA model equals the full-KV model whose KV head j holds GQA head j // (N/K)."""
  full_cfg = dataclasses.replace(TINY, n_kv_heads=TINY.n_heads)
  group, hd = TINY.n_heads // TINY.n_kv_heads, TINY.head_dim

  def expand(kernel_LxDx_KH):
    layers, d, _ = kernel_LxDx_KH.shape
    heads = kernel_LxDx_KH.reshape(layers, d, TINY.n_kv_heads, hd)
    return jnp.repeat(heads, group, axis=2).reshape(layers, d, TINY.n_heads * hd)

  full = jax.tree.map(lambda x: x, tiny_params)
  attn = dict(full["blocks"]["attn"])
  attn["k_proj"] = {"kernel": expand(attn["k_proj"]["kernel"])}
  attn["v_proj"] = {"kernel": expand(attn["v_proj"]["kernel"])}
  full["blocks"] = dict(full["blocks"], attn=attn)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 12), 0, TINY.vocab_size)
  valid = jnp.ones((2, 12), bool)
  np.testing.assert_allclose(
    _apply(TINY, tiny_params, tokens, valid), _apply(full_cfg, full, tokens, valid), atol=1e-5
  )


def test_scan_remat_and_unrolled_agree(family_model):
  TINY, tiny_params = family_model
  tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 12), 0, TINY.vocab_size)
  valid = jnp.ones((2, 12), bool)
  base = _apply(TINY, tiny_params, tokens, valid)
  unrolled = {k: v for k, v in tiny_params.items() if k != "blocks"}
  for i in range(TINY.n_layers):
    unrolled[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], tiny_params["blocks"])
  cfg = dataclasses.replace(TINY, scan_layers=False)
  np.testing.assert_allclose(base, _apply(cfg, unrolled, tokens, valid), atol=1e-5)
  for policy in ("full", "dots"):
    remat_cfg = dataclasses.replace(TINY, remat=policy)
    np.testing.assert_allclose(base, _apply(remat_cfg, tiny_params, tokens, valid), atol=1e-5)


@pytest.mark.parametrize("chunk", [4, 5, 12])
def test_chunked_log_probs_equal_whole_logits_in_value_and_gradient(tiny_params, chunk):
  """`logits_chunk` changes how the head's log-probabilities are computed (a rematerialized scan over
  position chunks, the last one padded when 12 is not a multiple), not what they are."""
  tokens = jax.random.randint(jax.random.PRNGKey(6), (3, 12), 0, TINY.vocab_size)
  targets = jax.random.randint(jax.random.PRNGKey(7), (3, 12), 0, TINY.vocab_size)
  valid = jnp.ones((3, 12), bool).at[1, :4].set(False)
  chunked = dataclasses.replace(TINY, logits_chunk=chunk)
  logits = _apply(TINY, tiny_params, tokens, valid)
  want = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
  for cfg in (TINY, chunked):
    got = _apply(cfg, tiny_params, tokens, valid, targets_BxS=targets)
    assert got.shape == (3, 12) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=1e-5)

  def grads(cfg):
    weight = jnp.linspace(0.5, 1.5, 36).reshape(3, 12)
    score = lambda p: (weight * _apply(cfg, p, tokens, valid, targets_BxS=targets)).sum()  # noqa: E731
    return jax.grad(score)(tiny_params)

  for a, b in zip(jax.tree.leaves(grads(TINY)), jax.tree.leaves(grads(chunked))):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_bad_model_config_names_the_problem():
  with pytest.raises(ValueError, match="n_kv_heads"):
    dataclasses.replace(TINY, n_kv_heads=3)
  with pytest.raises(ValueError, match="mask_token_id"):
    dataclasses.replace(TINY, mask_token_id=64)
  with pytest.raises(ValueError, match="remat"):
    dataclasses.replace(TINY, remat="sometimes")
  with pytest.raises(ValueError, match="logits_chunk"):
    dataclasses.replace(TINY, logits_chunk=-1)


def test_sharded_and_unsharded_forward_agree(family_model):
  TINY, tiny_params = family_model
  mesh = sharding.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})
  rules = sharding.rules_from_config(common.sharding_rules().to_dict())
  model = model_lib.Transformer(TINY)
  tx = state_lib.make_optimizer(
    state_lib.OptimConfig(1e-3, "constant", 0, 0.1, 0.0, 0.9, 0.99, 1e-8, 1.0, 10)
  )
  specs, _ = state_lib.logical_specs(model, tx, 12)
  shardings = sharding.logical_to_shardings(specs.params, mesh, rules)
  params = jax.device_put(tiny_params, shardings)
  assert params["blocks"]["attn"]["q_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
  tokens = jax.random.randint(jax.random.PRNGKey(5), (8, 12), 0, TINY.vocab_size)
  valid = jnp.ones((8, 12), bool).at[:, :3].set(False)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  fwd = jax.jit(lambda p, t, v: model.apply({"params": p}, t, v))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    sharded = fwd(
      params, jax.device_put(tokens, batch_sharding), jax.device_put(valid, batch_sharding)
    )
  assert len(sharded.sharding.device_set) == 8
  unsharded = _apply(TINY, tiny_params, tokens, valid)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(unsharded), atol=1e-5)


# Golden table: parameter -> mesh PartitionSpec under the default rules (embed->fsdp, the rest tensor).
GOLDEN_SPECS = {
  "wte": P("tensor", "fsdp"),
  "blocks/attn_norm/scale": P(None, "fsdp"),
  "blocks/attn/q_proj/kernel": P(None, "fsdp", "tensor"),
  "blocks/attn/k_proj/kernel": P(None, "fsdp", "tensor"),
  "blocks/attn/v_proj/kernel": P(None, "fsdp", "tensor"),
  "blocks/attn/attn_out/kernel": P(None, "tensor", "fsdp"),
  "blocks/ff_norm/scale": P(None, "fsdp"),
  "blocks/mlp/ff_proj/kernel": P(None, "fsdp", "tensor"),
  "blocks/mlp/up_proj/kernel": P(None, "fsdp", "tensor"),
  "blocks/mlp/ff_out/kernel": P(None, "tensor", "fsdp"),
  "ln_f/scale": P("fsdp"),
  "ff_out/kernel": P("fsdp", "tensor"),
}


# Dream's q/k/v biases follow their kernels' output axis (heads, or kv_heads: tensor).
DREAM_SPECS = {f"blocks/attn/{n}_proj/bias": P(None, "tensor") for n in "qkv"}


@pytest.mark.parametrize(
  "preset", ["tiny", "mini", "small", "1b", "llada_8b", "dream_tiny", "dream_7b"]
)
def test_golden_partition_specs(preset):
  values = {k: v for k, v in common.model_config(preset).items() if k != "preset"}
  cfg = model_lib.ModelConfig(**values)
  abstract = jax.eval_shape(
    lambda: model_lib.Transformer(cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), bool)
    )["params"]
  )
  rules = sharding.rules_from_config(common.sharding_rules().to_dict())
  logical = nn.get_partition_spec(abstract)
  got = {
    "/".join(k.key for k in path): nn.logical_to_mesh_axes(tuple(spec), rules)
    for path, spec in jax.tree_util.tree_leaves_with_path(
      logical, is_leaf=lambda x: isinstance(x, P)
    )
  }
  assert got == (GOLDEN_SPECS | DREAM_SPECS if preset.startswith("dream") else GOLDEN_SPECS)
  shapes = {
    "/".join(k.key for k in p): x.shape
    for p, x in jax.tree_util.tree_leaves_with_path(nn.unbox(abstract))
  }
  assert shapes["wte"] == (cfg.vocab_size, cfg.d_model)
  assert shapes["blocks/mlp/ff_proj/kernel"] == (cfg.n_layers, cfg.d_model, cfg.mlp_hidden)
  if preset == "llada_8b":
    assert 7.5e9 < cfg.num_params() < 8.5e9
  if preset == "dream_7b":  # Dream-v0-7B's model card: 7.62B
    assert round(cfg.num_params() / 1e9, 2) == 7.62
  if preset == "small":
    assert 5e6 < cfg.num_params() < 20e6
