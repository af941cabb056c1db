"""The Dream family's differences from LLaDA in the one Transformer: shifted predictions, q/k/v biases,
a head tied to the embedding."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from trafl_jax import convert, hf_format
from trafl_jax import model as model_lib

DREAM = model_lib.ModelConfig(**model_lib.PRESETS["dream_tiny"])


def _params(cfg, seed=0):
  tokens = jnp.zeros((1, 10), jnp.int32)
  params = model_lib.Transformer(cfg).init(jax.random.PRNGKey(seed), tokens, tokens >= 0)["params"]
  # Random biases: initialized at zero they would not show whether they are applied.
  flat = traverse_util.flatten_dict(nn.unbox(params))
  for i, (path, x) in enumerate(sorted(flat.items())):
    if path[-1] == "bias":
      flat[path] = jax.random.normal(jax.random.PRNGKey(100 + i), x.shape) * 0.5
  return traverse_util.unflatten_dict(flat)


def _apply(cfg, params, tokens, valid, **kw):
  return model_lib.Transformer(cfg).apply({"params": params}, tokens, valid, **kw)


TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 5, DREAM.vocab_size)
VALID = jnp.ones((2, 10), bool)


def test_a_dream_prediction_at_i_is_the_head_of_position_i_minus_1():
  params = _params(DREAM)
  shifted = _apply(DREAM, params, TOKENS, VALID)
  unshifted = _apply(dataclasses.replace(DREAM, shift_logits=False), params, TOKENS, VALID)
  np.testing.assert_allclose(shifted[:, 1:], unshifted[:, :-1], atol=1e-6)
  np.testing.assert_allclose(shifted[:, 0], unshifted[:, 0], atol=1e-6)
  # The sampler's completion logits (`logits_from`) keep the shift: the first comes from the prompt.
  tail = _apply(DREAM, params, TOKENS, VALID, logits_from=6)
  np.testing.assert_allclose(tail, unshifted[:, 5:-1], atol=1e-6)


def test_dream_biases_q_k_v_and_not_the_rest():
  params = traverse_util.flatten_dict(_params(DREAM))
  biased = sorted(p[-2] for p in params if p[-1] == "bias")
  assert biased == ["k_proj", "q_proj", "v_proj"]
  assert params[("blocks", "attn", "q_proj", "bias")].shape == (2, 64)  # scanned: [layers, out]
  llada = traverse_util.flatten_dict(_params(dataclasses.replace(DREAM, qkv_bias=False)))
  assert not any(p[-1] == "bias" for p in llada)
  no_bias = {p: x for p, x in params.items() if p[-1] != "bias"}
  with_bias = _apply(DREAM, traverse_util.unflatten_dict(params), TOKENS, VALID)
  without = _apply(
    dataclasses.replace(DREAM, qkv_bias=False), traverse_util.unflatten_dict(no_bias), TOKENS, VALID
  )
  assert float(jnp.abs(with_bias - without).max()) > 1e-3


def test_a_tied_head_is_the_embedding_transposed():
  tied = dataclasses.replace(DREAM, tie_embeddings=True, shift_logits=False)
  params = _params(tied)
  assert "ff_out" not in params
  logits, hidden = _apply(tied, params, TOKENS, VALID, return_hidden=True)
  np.testing.assert_allclose(logits, hidden @ params["wte"].T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_dream_log_probs_chunked_or_not_equal_the_shifted_logits(tie):
  cfg = dataclasses.replace(DREAM, tie_embeddings=tie)
  params = _params(cfg)
  logits = _apply(cfg, params, TOKENS, VALID)
  want = jnp.take_along_axis(jax.nn.log_softmax(logits), TOKENS[..., None], -1)[..., 0]
  for chunk in (0, 4):
    got = _apply(
      dataclasses.replace(cfg, logits_chunk=chunk), params, TOKENS, VALID, targets_BxS=TOKENS
    )
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_an_unknown_family_is_named():
  with pytest.raises(ValueError, match="model family 'gpt'"):
    dataclasses.replace(DREAM, family="gpt")


def _write_dream_hf(path, cfg, params, dtype=None):
  convert.write_hf(params, cfg, str(path), dtype)
  return str(path)


@pytest.mark.parametrize("tie", [False, True])
def test_dream_hugging_face_layout_round_trips(tmp_path, tie):
  cfg = dataclasses.replace(DREAM, tie_embeddings=tie)
  params = _params(cfg)
  hf_dir = _write_dream_hf(tmp_path / "hf", cfg, params)
  with open(f"{hf_dir}/config.json") as f:
    config = json.load(f)
  assert config["model_type"] == "Dream" and config["tie_word_embeddings"] is tie
  names = set(hf_format.read_safetensors(hf_dir))
  assert {
    "model.embed_tokens.weight",
    "model.norm.weight",
    "model.layers.1.self_attn.q_proj.bias",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.0.post_attention_layernorm.weight",
  } <= names
  assert ("lm_head.weight" in names) is not tie
  assert len(names) == 2 + (not tie) + cfg.n_layers * 12
  assert hf_format.model_config_from_hf(hf_dir) == cfg
  # Through our checkpoint and back: the same tensors, bit for bit, and the same logits.
  ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
  convert.hf_to_orbax(hf_dir, ckpt)
  convert.orbax_to_hf(ckpt, back)
  original, again = hf_format.read_safetensors(hf_dir), hf_format.read_safetensors(back)
  assert set(original) == set(again)
  for name, x in original.items():
    np.testing.assert_array_equal(again[name], x)
  loaded, loaded_cfg = hf_format.load_hf_params(back)
  np.testing.assert_array_equal(
    _apply(loaded_cfg, loaded, TOKENS, VALID), _apply(cfg, params, TOKENS, VALID)
  )


def test_dream_tensors_that_do_not_fit_are_all_named(tmp_path):
  tensors = hf_format.params_to_hf(_params(DREAM), DREAM)
  del tensors["model.layers.0.self_attn.k_proj.bias"]
  tensors["model.layers.1.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
  tensors["model.norm.weight"] = np.zeros(65, np.float32)
  with pytest.raises(ValueError) as e:
    hf_format.hf_to_params(tensors, DREAM)
  message = str(e.value)
  assert "3 problems" in message
  assert "missing model.layers.0.self_attn.k_proj.bias" in message
  assert "unexpected model.layers.1.self_attn.o_proj.bias" in message
  assert "model.norm.weight has shape (65,), expected (64,)" in message


def test_a_config_json_of_another_family_is_named(tmp_path):
  (tmp_path / "config.json").write_text('{"model_type": "llama"}')
  with pytest.raises(ValueError, match="model_type 'llama' is not a family"):
    hf_format.model_config_from_hf(str(tmp_path))


def test_left_padding_does_not_change_a_dream_row():
  """A left-padded row's valid positions compute what the unpadded row does. Dream numbers positions from
  the first valid token (its `tok_idx`) where we number them from the sequence's start: RoPE's scores
  depend only on the distance between positions, so the two agree up to rounding."""
  params = _params(DREAM)
  row = TOKENS[:1, 3:]
  padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), row], axis=1)
  valid = jnp.arange(10)[None] >= 3
  alone = _apply(DREAM, params, row, jnp.ones_like(row, bool))
  np.testing.assert_allclose(_apply(DREAM, params, padded, valid)[:, 4:], alone[:, 1:], atol=1e-5)


@pytest.mark.parametrize(
  "cfg",
  [
    model_lib.ModelConfig(**model_lib.PRESETS["dream_7b"]),
    dataclasses.replace(DREAM, tie_embeddings=True),
    DREAM,
  ],
)
def test_num_params_counts_biases_and_a_tied_head(cfg):
  tokens = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(
    lambda: model_lib.Transformer(cfg).init(jax.random.PRNGKey(0), tokens, tokens >= 0)
  )
  assert cfg.num_params() == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  if cfg.vocab_size == 152064:  # Dream-v0-7B: Qwen2.5-7B's 7.62B parameters
    assert round(cfg.num_params() / 1e9, 2) == 7.62
