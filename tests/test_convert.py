"""Hugging Face LLaDA <-> orbax conversion: exact round trips, a NumPy reference forward, clear errors."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import linen as nn
from safetensors import numpy as st_numpy

from trafl_jax import checkpoint, convert, hf_format
from trafl_jax import model as model_lib

from .conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, L, N, K, F, V, EPS, THETA = 32, 2, 4, 2, 48, 64, 1e-6, 500000.0
HD = D // N
P = "model.transformer."
HF_CONFIG = {
  "architectures": ["LLaDAModelLM"],
  "model_type": "llada",
  "activation_type": "silu",
  "block_type": "llama",
  "d_model": D,
  "n_heads": N,
  "n_kv_heads": K,
  "n_layers": L,
  "mlp_hidden_size": F,
  "mlp_ratio": 4,
  "vocab_size": V,
  "embedding_size": V,
  "rope_theta": THETA,
  "rms_norm_eps": EPS,
  "mask_token_id": 60,
  "eos_token_id": 61,
  "pad_token_id": 62,
  "include_bias": False,
  "weight_tying": False,
  "alibi": False,
  "layer_norm_type": "rms",
}


def _torch_tensors(dtype=np.float32, seed=0) -> dict[str, np.ndarray]:
  """Random tensors with LLaDA's names and torch layout, written out by hand (not from the module)."""
  rng = np.random.default_rng(seed)
  shapes = {P + "wte.weight": (V, D)}
  for i in range(L):
    b = f"{P}blocks.{i}."
    shapes.update({b + "attn_norm.weight": (D,), b + "q_proj.weight": (D, D)})
    shapes.update({b + "k_proj.weight": (K * HD, D), b + "v_proj.weight": (K * HD, D)})
    shapes.update({b + "attn_out.weight": (D, D), b + "ff_norm.weight": (D,)})
    shapes.update({b + "ff_proj.weight": (F, D), b + "up_proj.weight": (F, D)})
    shapes[b + "ff_out.weight"] = (D, F)
  shapes.update({P + "ln_f.weight": (D,), P + "ff_out.weight": (V, D)})
  out = {}
  for name, shape in shapes.items():
    x = 1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else rng.standard_normal(shape)
    out[name] = (x * (1.0 if len(shape) == 1 else 0.3)).astype(dtype)
  return out


def _write_hf_dir(path, tensors, config=None, shards=1) -> str:
  """An HF directory as LLaDA ships it: one model.safetensors, or shards plus an index."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config or HF_CONFIG, f)
  with open(os.path.join(path, "tokenizer.json"), "w") as f:
    f.write('{"fake": "tokenizer"}')
  if shards == 1:
    st_numpy.save_file(tensors, os.path.join(path, "model.safetensors"), {"format": "pt"})
    return str(path)
  names = list(tensors)
  weight_map = {}
  for k in range(shards):
    fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
    part = names[k::shards]
    st_numpy.save_file({n: tensors[n] for n in part}, os.path.join(path, fname), {"format": "pt"})
    weight_map.update(dict.fromkeys(part, fname))
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
  return str(path)


def _bitwise_equal(a: dict, b: dict) -> None:
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert a[k].tobytes() == b[k].tobytes(), k


def _cfg(**kw) -> model_lib.ModelConfig:
  base = dict(vocab_size=V, d_model=D, n_layers=L, n_heads=N, n_kv_heads=K, mlp_hidden=F)
  base.update(mask_token_id=60, eos_token_id=61, pad_token_id=62, rope_theta=THETA)
  return model_lib.ModelConfig(**base, rms_norm_eps=EPS, **kw)


def _model_tree_shapes(cfg):
  init = lambda: model_lib.Transformer(cfg).init(
    jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool)
  )["params"]
  return jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(jax.eval_shape(init)))


def test_config_from_hf_and_back(tmp_path):
  src = _write_hf_dir(tmp_path / "hf", _torch_tensors())
  cfg = hf_format.model_config_from_hf(src)
  assert cfg == _cfg()
  assert hf_format.model_config_from_hf(src, scan_layers=False).scan_layers is False
  back = hf_format.hf_config_dict(cfg)
  assert back["architectures"] == ["LLaDAModelLM"] and back["model_type"] == "llada"
  assert {k: back[k] for k in HF_CONFIG if k != "mlp_ratio"} == {
    k: v for k, v in HF_CONFIG.items() if k != "mlp_ratio"
  }
  assert hf_format.is_hf_dir(src) and not hf_format.is_hf_dir(str(tmp_path))


def test_config_padding_defaults_and_unsupported(tmp_path):
  tensors = _torch_tensors()
  # LLaDA pads the embedding beyond vocab_size; the tensor's rows decide.
  padded = dict(HF_CONFIG, vocab_size=V - 4, embedding_size=V, n_kv_heads=None)
  del padded["pad_token_id"]
  cfg = hf_format.model_config_from_hf(_write_hf_dir(tmp_path / "a", tensors, padded))
  assert (cfg.vocab_size, cfg.n_kv_heads, cfg.pad_token_id) == (V, N, 61)
  small = {**tensors, P + "wte.weight": tensors[P + "wte.weight"][: V - 8]}
  with pytest.raises(ValueError, match="exceeds the embedding's 56 rows"):
    hf_format.model_config_from_hf(_write_hf_dir(tmp_path / "b", small, padded))
  bad = dict(HF_CONFIG, activation_type="gelu", include_bias=True, weight_tying=True)
  with pytest.raises(ValueError, match="activation_type.*include_bias.*weight_tying"):
    hf_format.model_config_from_hf(_write_hf_dir(tmp_path / "c", tensors, bad))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("scan", [True, False])
def test_hf_params_hf_round_trip_is_exact(dtype, scan):
  cfg = _cfg(scan_layers=scan, param_dtype=np.dtype(dtype).name)
  tensors = _torch_tensors(dtype)
  params = hf_format.hf_to_params(tensors, cfg)
  # Exactly the tree (paths, shapes, dtypes) the model creates.
  assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == _model_tree_shapes(cfg)
  assert ("blocks" in params) == scan and ("blocks_1" in params) == (not scan)
  _bitwise_equal(hf_format.params_to_hf(params, cfg), tensors)


def _reference_logits(t: dict, tokens_BxT: np.ndarray, valid_BxT: np.ndarray) -> np.ndarray:
  """LLaDA's forward from the torch-layout tensors in float64, written independently of the model."""
  w = {k: v.astype(np.float64) for k, v in t.items()}
  b, s = tokens_BxT.shape

  def rms(x, scale):
    return scale * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS)

  def rope(x_BxTxH):  # dimension i pairs with i + HD/2; inv_freq[i] = theta^(-2i/HD)
    out = np.empty_like(x_BxTxH)
    for i in range(HD // 2):
      angle_T = np.arange(s) * THETA ** (-2.0 * i / HD)
      c, sn = np.cos(angle_T)[None], np.sin(angle_T)[None]
      lo, hi = x_BxTxH[..., i], x_BxTxH[..., i + HD // 2]
      out[..., i], out[..., i + HD // 2] = lo * c - hi * sn, hi * c + lo * sn
    return out

  x = w[P + "wte.weight"][tokens_BxT]
  for i in range(L):
    p = f"{P}blocks.{i}."
    h = rms(x, w[p + "attn_norm.weight"])
    q, k, v = (h @ w[p + n + "_proj.weight"].T for n in ("q", "k", "v"))
    heads = []
    for j in range(N):
      g = j // (N // K)
      qj = rope(q[..., j * HD : (j + 1) * HD])
      kg = rope(k[..., g * HD : (g + 1) * HD])
      scores = np.einsum("bqh,bkh->bqk", qj, kg) / np.sqrt(HD)
      scores = np.where(valid_BxT[:, None, :], scores, -np.inf)  # bidirectional; keys only
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      heads.append(probs @ v[..., g * HD : (g + 1) * HD])
    x = x + np.concatenate(heads, -1) @ w[p + "attn_out.weight"].T
    h = rms(x, w[p + "ff_norm.weight"])
    gate, up = h @ w[p + "ff_proj.weight"].T, h @ w[p + "up_proj.weight"].T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "ff_out.weight"].T
  return rms(x, w[P + "ln_f.weight"]) @ w[P + "ff_out.weight"].T


@pytest.mark.parametrize("scan", [True, False])
def test_converted_params_match_numpy_reference(tmp_path, scan):
  tensors = _torch_tensors()
  src = _write_hf_dir(tmp_path / "hf", tensors, shards=3)
  cfg = hf_format.model_config_from_hf(src, scan_layers=scan)
  params, cfg = hf_format.load_hf_params(src, cfg)
  tokens = np.random.default_rng(1).integers(0, V, (2, 10)).astype(np.int32)
  valid = np.ones((2, 10), bool)
  valid[1, 7:] = False
  logits = model_lib.Transformer(cfg).apply({"params": params}, tokens, valid)
  np.testing.assert_allclose(
    np.asarray(logits), _reference_logits(tensors, tokens, valid), atol=1e-4, rtol=1e-4
  )


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_read_sharded_and_write_hf(tmp_path, dtype):
  tensors = _torch_tensors(dtype)
  single = hf_format.read_safetensors(_write_hf_dir(tmp_path / "one", tensors))
  sharded = hf_format.read_safetensors(_write_hf_dir(tmp_path / "three", tensors, shards=3))
  _bitwise_equal(single, tensors)
  _bitwise_equal(sharded, tensors)
  up = hf_format.read_safetensors(str(tmp_path / "three"), dtype="float32")
  assert all(x.dtype == np.float32 for x in up.values())

  params, cfg = hf_format.load_hf_params(str(tmp_path / "one"))
  assert cfg.param_dtype == np.dtype(dtype).name
  out = tmp_path / "out"
  convert.write_hf(params, cfg, str(out), max_shard_bytes=4096, src_dir=str(tmp_path / "one"))
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
  assert (out / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
  _bitwise_equal(hf_format.read_safetensors(str(out)), tensors)
  assert hf_format.model_config_from_hf(str(out)) == dataclasses.replace(cfg, param_dtype="float32")
  # The file records true BF16 / F32 tensors, as torch reads them.
  raw = (out / index["weight_map"][P + "wte.weight"]).read_bytes()
  header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
  assert header[P + "wte.weight"]["dtype"] == {np.float32: "F32"}.get(dtype, "BF16")
  convert.write_hf(params, cfg, str(tmp_path / "cast"), dtype="float32")
  cast = hf_format.read_safetensors(str(tmp_path / "cast"))
  assert (tmp_path / "cast" / "model.safetensors").exists()
  assert all(x.dtype == np.float32 for x in cast.values())
  with pytest.raises(ValueError, match="not empty"):
    convert.write_hf(params, cfg, str(out))


def test_bad_tensors_are_all_named(tmp_path):
  cfg = _cfg()
  tensors = _torch_tensors()
  broken = dict(tensors)
  del broken[P + "blocks.1.q_proj.weight"], broken[P + "ln_f.weight"]
  broken[P + "blocks.0.q_proj.bias"] = np.zeros(D, np.float32)
  broken[P + "blocks.1.k_proj.weight"] = np.zeros((D, D), np.float32)
  with pytest.raises(ValueError) as e:
    hf_format.hf_to_params(broken, cfg)
  for part in (
    "missing model.transformer.blocks.1.q_proj.weight",
    "missing model.transformer.ln_f.weight",
    "unexpected model.transformer.blocks.0.q_proj.bias",
    "model.transformer.blocks.1.k_proj.weight has shape (32, 32), expected (16, 32)",
  ):
    assert part in str(e.value)
  params = hf_format.hf_to_params(tensors, cfg)
  del params["blocks"]["mlp"]["up_proj"]
  with pytest.raises(ValueError, match="missing blocks/mlp/up_proj/kernel"):
    hf_format.params_to_hf(params, cfg)


def test_missing_shard_and_absent_tensor_are_named(tmp_path):
  src = tmp_path / "hf"
  _write_hf_dir(src, _torch_tensors(), shards=3)
  index_path = src / "model.safetensors.index.json"
  index = json.loads(index_path.read_text())
  index["weight_map"][P + "blocks.9.extra.weight"] = "model-00002-of-00003.safetensors"
  index_path.write_text(json.dumps(index))
  with pytest.raises(ValueError, match=r"blocks\.9\.extra\.weight \(in model-00002-of-00003"):
    hf_format.read_safetensors(str(src))
  os.remove(src / "model-00003-of-00003.safetensors")
  with pytest.raises(FileNotFoundError, match="model-00003-of-00003.safetensors"):
    hf_format.read_safetensors(str(src))


def _cli(*args) -> subprocess.CompletedProcess:
  env = subprocess_env(devices=1)
  cmd = [sys.executable, "-m", "trafl_jax.convert", *args]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_cli_hf_orbax_hf_round_trip(tmp_path, dtype):
  tensors = _torch_tensors(dtype)
  src = _write_hf_dir(tmp_path / "hf", tensors, shards=2)
  ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
  result = _cli(f"--src={src}", f"--dst={ckpt}")
  assert result.returncode == 0, result.stderr
  with open(os.path.join(ckpt, "model_config.json")) as f:
    saved = json.load(f)
  assert saved["param_dtype"] == np.dtype(dtype).name
  assert os.path.isfile(os.path.join(ckpt, "tokenizer.json"))
  result = _cli(f"--src={ckpt}", f"--dst={back}", "--to=hf")
  assert result.returncode == 0, result.stderr
  _bitwise_equal(hf_format.read_safetensors(back), tensors)
  assert hf_format.model_config_from_hf(back) == hf_format.model_config_from_hf(src)
  assert os.path.isfile(os.path.join(back, "tokenizer.json"))

  # init_checkpoint's path: restore into the model's own (float32) params on a mesh of 8 devices.
  cfg = convert.model_config_from_dir(ckpt)
  assert cfg == _cfg(param_dtype=np.dtype(dtype).name)
  target = _cfg()
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(8), ("fsdp",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s[0], s[1], sharding=replicated),
    _model_tree_shapes(target),
    is_leaf=lambda x: isinstance(x, tuple),
  )
  restored = checkpoint.restore_params(ckpt, abstract)
  expected = hf_format.hf_to_params({k: x.astype(np.float32) for k, x in tensors.items()}, target)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), restored, expected)


def test_cli_errors_are_one_line(tmp_path):
  src = _write_hf_dir(tmp_path / "hf", _torch_tensors())
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("precious")
  result = _cli(f"--src={src}", f"--dst={tmp_path / 'full'}")
  assert result.returncode == 1
  assert "not empty" in result.stderr and "Traceback" not in result.stderr
  assert (tmp_path / "full" / "keep.txt").read_text() == "precious"
  os.remove(os.path.join(src, "model.safetensors"))
  result = _cli(f"--src={src}", f"--dst={tmp_path / 'new'}")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "not a Hugging Face model directory" in result.stderr


def test_training_checkpoint_to_hf(tmp_path):
  """A step dir of ours (params + the run config orbax's JsonSave wrote) converts from the workdir."""
  cfg = _cfg(scan_layers=False)
  tensors = _torch_tensors()
  step_dir = tmp_path / "work" / "checkpoints" / "20"
  checkpoint.save_params(str(step_dir), jax.device_put(hf_format.hf_to_params(tensors, cfg)))
  (step_dir / "config").mkdir()
  run_config = {
    "model": {**dataclasses.asdict(cfg), "preset": "x"},
    "tokenizer": {"kind": "sentencepiece"},
  }
  (step_dir / "config" / "metadata").write_text(json.dumps(run_config))
  assert convert.model_config_from_dir(str(tmp_path / "work")) == cfg
  convert.orbax_to_hf(str(tmp_path / "work"), str(tmp_path / "hf"))
  _bitwise_equal(hf_format.read_safetensors(str(tmp_path / "hf")), tensors)
