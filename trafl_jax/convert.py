"""Hugging Face LLaDA checkpoints <-> our orbax params checkpoints.

  python -m trafl_jax.convert --src=HF_DIR --dst=CKPT_DIR             # HF -> orbax params
  python -m trafl_jax.convert --src=CKPT_DIR --dst=HF_DIR --to=hf     # orbax -> HF

The orbax side is what `init_checkpoint` reads: `<dst>/params`, plus `<dst>/model_config.json` (the
ModelConfig fields, so the directory describes itself) and the tokenizer files. Conversion is a rename and a
transpose (torch Linear weights are [out, in], flax Dense kernels [in, out]); with scanned layers each block
tensor is stacked on a leading layer axis. Every check names all offending tensors; nothing is filled in.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import sys

import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import app, flags, logging
from safetensors import numpy as st_numpy
from safetensors import safe_open

from trafl_jax import checkpoint
from trafl_jax import model as model_lib

PREFIX = "model.transformer."
CONFIG_JSON = "config.json"
MODEL_CONFIG_JSON = "model_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5_000_000_000  # Hugging Face's save_pretrained default
# Carried between directories: tokenizer, generation defaults, and LLaDA's remote modeling code.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SIDE_FILES = TOKENIZER_FILES + (
  "generation_config.json",
  "configuration_llada.py",
  "modeling_llada.py",
)
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}

# (name inside an HF block, path inside a flax Block, torch shape in D/K/F/V, torch Linear weight that
# needs a transpose). D: d_model, K: n_kv_heads * head_dim, F: mlp_hidden, V: vocabulary.
_BLOCK_MAP = (
  ("attn_norm.weight", ("attn_norm", "scale"), "D", False),
  ("q_proj.weight", ("attn", "q_proj", "kernel"), "DD", True),
  ("k_proj.weight", ("attn", "k_proj", "kernel"), "KD", True),
  ("v_proj.weight", ("attn", "v_proj", "kernel"), "KD", True),
  ("attn_out.weight", ("attn", "attn_out", "kernel"), "DD", True),
  ("ff_norm.weight", ("ff_norm", "scale"), "D", False),
  ("ff_proj.weight", ("mlp", "ff_proj", "kernel"), "FD", True),  # the SiLU gate
  ("up_proj.weight", ("mlp", "up_proj", "kernel"), "FD", True),
  ("ff_out.weight", ("mlp", "ff_out", "kernel"), "DF", True),
)
_TOP_MAP = (
  ("wte.weight", ("wte",), "VD", False),  # an embedding, not a Linear: [vocab, d] on both sides
  ("ln_f.weight", ("ln_f", "scale"), "D", False),
  ("ff_out.weight", ("ff_out", "kernel"), "VD", True),  # the untied output head
)
# LLaDAConfig fields that would change the computation: field -> the values this model implements.
_SUPPORTED = {
  "activation_type": (None, "silu", "swiglu"),
  "layer_norm_type": (None, "rms"),
  "block_type": (None, "llama"),
  "rope": (None, True),
  "layer_norm_with_affine": (None, True),
  "clip_qkv": (None,),
  **dict.fromkeys(
    "include_bias include_qkv_bias bias_for_layer_norm weight_tying alibi scale_logits "  # noqa: SIM905
    "input_emb_norm attention_layer_norm".split(),
    (None, False),
  ),
}


def _natural_key(name: str):
  return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def _mapping(cfg: model_lib.ModelConfig):
  """Yields (hf name, flax path, layer index on the stacked axis or None, torch shape, transposed)."""
  dims = dict(D=cfg.d_model, K=cfg.n_kv_heads * cfg.head_dim, F=cfg.mlp_hidden, V=cfg.vocab_size)
  shape = lambda spec: tuple(dims[c] for c in spec)
  name, path, spec, transposed = _TOP_MAP[0]
  yield PREFIX + name, path, None, shape(spec), transposed
  for i in range(cfg.n_layers):
    for name, path, spec, transposed in _BLOCK_MAP:
      hf_name = f"{PREFIX}blocks.{i}.{name}"
      if cfg.scan_layers:
        yield hf_name, ("blocks", *path), i, shape(spec), transposed
      else:
        yield hf_name, (f"blocks_{i}", *path), None, shape(spec), transposed
  for name, path, spec, transposed in _TOP_MAP[1:]:
    yield PREFIX + name, path, None, shape(spec), transposed


def hf_shapes(cfg: model_lib.ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor of a LLaDA checkpoint and its torch shape."""
  return {name: shape for name, _, _, shape, _ in _mapping(cfg)}


def flax_shapes(cfg: model_lib.ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Every leaf of `Transformer(cfg)`'s params (by path) and its shape."""
  shapes = {}
  for _, path, layer, shape, transposed in _mapping(cfg):
    shape = shape[::-1] if transposed else shape
    shapes[path] = shape if layer is None else (cfg.n_layers, *shape)
  return shapes


def _check(got: dict, want: dict, what: str) -> None:
  """One error naming every missing, unexpected and misshapen tensor."""
  show = lambda k: k if isinstance(k, str) else "/".join(k)
  problems = [f"missing {show(k)}" for k in want if k not in got]
  extra = sorted((k for k in got if k not in want), key=lambda k: _natural_key(show(k)))
  problems += [f"unexpected {show(k)}" for k in extra]
  problems += [
    f"{show(k)} has shape {tuple(got[k])}, expected {tuple(want[k])}"
    for k in want
    if k in got and tuple(got[k]) != tuple(want[k])
  ]
  if problems:
    raise ValueError(
      f"{what} do not fit the model ({len(problems)} problems): {'; '.join(problems)}"
    )


def hf_to_params(tensors: dict[str, np.ndarray], cfg: model_lib.ModelConfig) -> dict:
  """Torch-layout LLaDA tensors -> the params tree of `model_lib.Transformer(cfg)` (numpy leaves)."""
  _check({k: np.shape(x) for k, x in tensors.items()}, hf_shapes(cfg), "Hugging Face tensors")
  params, stacks = {}, {}
  for name, path, layer, _, transposed in _mapping(cfg):
    x = tensors[name].T if transposed else tensors[name]
    if layer is None:
      _set(params, path, np.ascontiguousarray(x))
    else:
      stacks.setdefault(path, []).append(x)
  for path, layers in stacks.items():
    _set(params, path, np.stack(layers))
  return params


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _flatten(params) -> dict[tuple[str, ...], np.ndarray]:
  leaves = jax.tree_util.tree_leaves_with_path(flax.core.meta.unbox(params))
  return {tuple(str(getattr(k, "key", k)) for k in p): np.asarray(x) for p, x in leaves}


def params_to_hf(params, cfg: model_lib.ModelConfig) -> dict[str, np.ndarray]:
  """The exact inverse of `hf_to_params` (accepts numpy or JAX leaves, boxed or not)."""
  flat = _flatten(params)
  _check({k: x.shape for k, x in flat.items()}, flax_shapes(cfg), "parameters")
  tensors = {}
  for name, path, layer, _, transposed in _mapping(cfg):
    x = flat[path] if layer is None else flat[path][layer]
    tensors[name] = np.ascontiguousarray(x.T if transposed else x)
  return tensors


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e


def _weight_files(hf_dir: str) -> dict[str, list[str] | None]:
  """file name -> the tensors the index lists in it (None: no index, take what the file holds)."""
  if os.path.isfile(os.path.join(hf_dir, SINGLE_FILE)):
    return {SINGLE_FILE: None}
  index_path = os.path.join(hf_dir, INDEX_FILE)
  if os.path.isfile(index_path):
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"{index_path} has no weight_map")
    files: dict[str, list[str]] = {}
    for tensor, fname in weight_map.items():
      files.setdefault(fname, []).append(tensor)
    missing = [f for f in sorted(files) if not os.path.isfile(os.path.join(hf_dir, f))]
    if missing:
      raise FileNotFoundError(f"{index_path} lists shard files that are missing: {missing}")
    return files
  found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(hf_dir, "*.safetensors")))
  if not found:
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {hf_dir}")
  return dict.fromkeys(found)


def read_safetensors(hf_dir: str, dtype: str | None = None) -> dict[str, np.ndarray]:
  """All tensors of a single-file or sharded checkpoint; `dtype` (a DTYPES key) casts, None keeps."""
  files = _weight_files(hf_dir)
  absent, tensors = [], {}
  for fname, listed in files.items():
    path = os.path.join(hf_dir, fname)
    try:
      with safe_open(path, framework="np") as f:
        keys = list(f.keys())
        absent += [f"{t} (in {fname})" for t in listed or () if t not in set(keys)]
        if absent:
          continue  # report every absent tensor before reading any data
        for key in keys:
          if key in tensors:
            raise ValueError(f"tensor {key} appears in more than one file of {hf_dir}")
          tensors[key] = f.get_tensor(key)
    except ValueError:
      raise
    except Exception as e:  # noqa: BLE001 -- safetensors' own error types vary by version
      raise ValueError(f"cannot read {path}: {e}") from e
  if absent:
    raise ValueError(f"tensors listed in {INDEX_FILE} are absent from their files: {absent}")
  for key, x in tensors.items():
    if x.dtype.name not in DTYPES:
      raise ValueError(f"tensor {key} has dtype {x.dtype.name}; expected one of {list(DTYPES)}")
    if dtype is not None and x.dtype != DTYPES[dtype]:
      tensors[key] = x.astype(DTYPES[dtype])
  return tensors


def is_hf_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_JSON)) and (
    os.path.isfile(os.path.join(path, INDEX_FILE))
    or bool(glob.glob(os.path.join(path, "*.safetensors")))
  )


def _wte_rows(hf_dir: str) -> int | None:
  """The embedding's first dim from the safetensors header (no data read); None if not found."""
  name = PREFIX + "wte.weight"
  try:
    for fname, listed in _weight_files(hf_dir).items():
      if listed is None or name in listed:
        with safe_open(os.path.join(hf_dir, fname), framework="np") as f:
          names = f.keys()
          if name in names:
            return int(f.get_slice(name).get_shape()[0])
  except Exception:  # noqa: BLE001 -- reading the weights reports the real problem later
    return None
  return None


def model_config_from_hf(hf_dir: str, **overrides) -> model_lib.ModelConfig:
  """ModelConfig from a LLaDA `config.json`; `overrides` set the compute-only fields (dtype, ...)."""
  path = os.path.join(hf_dir, CONFIG_JSON)
  c = _read_json(path)
  bad = [f"{k}={c.get(k)!r}" for k, ok in _SUPPORTED.items() if c.get(k) not in ok]
  if bad:
    raise ValueError(f"{path}: unsupported LLaDA settings (this model has no such variant): {bad}")
  missing = [k for k in ("d_model", "n_heads", "n_layers", "vocab_size") if c.get(k) is None]
  if missing:
    raise ValueError(f"{path}: missing fields {missing}")
  vocab = max(c["vocab_size"], c.get("embedding_size") or 0)
  rows = _wte_rows(hf_dir)
  if rows is not None:  # LLaDA pads the embedding; the tensor is the truth
    if rows < c["vocab_size"]:
      raise ValueError(f"{path}: vocab_size {c['vocab_size']} exceeds the embedding's {rows} rows")
    vocab = rows
  get = lambda k, default: default if c.get(k) is None else c[k]
  first = lambda v: v[0] if isinstance(v, list) else v  # some configs list several ids
  eos = first(get("eos_token_id", 126081))
  eps = c.get("rms_norm_eps") or c.get("layer_norm_eps") or 1e-5
  fields = dict(
    vocab_size=vocab,
    d_model=c["d_model"],
    n_layers=c["n_layers"],
    n_heads=c["n_heads"],
    n_kv_heads=1 if c.get("multi_query_attention") else c.get("n_kv_heads") or c["n_heads"],
    mlp_hidden=c.get("mlp_hidden_size") or get("mlp_ratio", 4) * c["d_model"],
    mask_token_id=get("mask_token_id", 126336),
    eos_token_id=eos,
    pad_token_id=first(get("pad_token_id", eos)),
    rope_theta=float(get("rope_theta", 10000.0)),
    rms_norm_eps=float(eps),
  )
  return model_lib.ModelConfig(**{**fields, **overrides})


def hf_config_dict(cfg: model_lib.ModelConfig) -> dict:
  """The LLaDA `config.json` for `cfg` (the inverse of `model_config_from_hf`)."""
  return {
    "architectures": ["LLaDAModelLM"],
    "model_type": "llada",
    "d_model": cfg.d_model,
    "n_heads": cfg.n_heads,
    "n_kv_heads": cfg.n_kv_heads,
    "n_layers": cfg.n_layers,
    "mlp_hidden_size": cfg.mlp_hidden,
    "vocab_size": cfg.vocab_size,
    "embedding_size": cfg.vocab_size,
    "rope_theta": cfg.rope_theta,
    "rms_norm_eps": cfg.rms_norm_eps,
    "mask_token_id": cfg.mask_token_id,
    "eos_token_id": cfg.eos_token_id,
    "pad_token_id": cfg.pad_token_id,
    "activation_type": "silu",
    "block_type": "llama",
    "layer_norm_type": "rms",
    "rope": True,
    "alibi": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "weight_tying": False,
    "use_cache": False,
  }


def load_hf_params(hf_dir: str, cfg: model_lib.ModelConfig | None = None, dtype: str | None = None):
  """(params, cfg) from an HF directory; the returned cfg's param_dtype is that of the params."""
  cfg = cfg or model_config_from_hf(hf_dir)
  tensors = read_safetensors(hf_dir, dtype)
  if len({x.dtype for x in tensors.values()}) > 1:  # mixed files: one dtype, without loss
    tensors = {k: x.astype(np.float32) for k, x in tensors.items()}
  params = hf_to_params(tensors, cfg)
  stored = next(iter(tensors.values())).dtype.name
  return params, dataclasses.replace(cfg, param_dtype=stored)


def _require_empty(path: str) -> None:
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise ValueError(f"destination {path} exists and is not empty; refusing to overwrite it")


def _copy_side_files(src_dir: str | None, dst_dir: str) -> list[str]:
  copied = []
  for name in SIDE_FILES if src_dir else ():
    if os.path.isfile(os.path.join(src_dir, name)):
      shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))
      copied.append(name)
  return copied


def write_hf(
  params,
  cfg: model_lib.ModelConfig,
  dst_dir: str,
  dtype: str | None = None,
  max_shard_bytes: int = DEFAULT_SHARD_BYTES,
  src_dir: str | None = None,
) -> None:
  """Writes config.json and safetensors (sharded with an index above `max_shard_bytes`) to a new or
  empty `dst_dir`, in the params' dtype or `dtype`; copies SIDE_FILES from `src_dir` when given."""
  _require_empty(dst_dir)
  tensors = params_to_hf(params, cfg)
  if dtype is not None:
    tensors = {k: x.astype(DTYPES[dtype]) for k, x in tensors.items()}
  shards, size = [[]], 0
  for name in tensors:  # in checkpoint order; a tensor larger than the limit gets a shard alone
    if shards[-1] and size + tensors[name].nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += tensors[name].nbytes
  os.makedirs(dst_dir, exist_ok=True)
  metadata = {"format": "pt"}  # transformers refuses safetensors files without it
  if len(shards) == 1:
    st_numpy.save_file(tensors, os.path.join(dst_dir, SINGLE_FILE), metadata=metadata)
  else:
    weight_map = {}
    for k, names in enumerate(shards):
      fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
      st_numpy.save_file({n: tensors[n] for n in names}, os.path.join(dst_dir, fname), metadata)
      weight_map.update(dict.fromkeys(names, fname))
    total = sum(x.nbytes for x in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(dst_dir, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
  config = hf_config_dict(cfg)
  config["torch_dtype"] = next(iter(tensors.values())).dtype.name
  if {"configuration_llada.py", "modeling_llada.py"} <= set(_copy_side_files(src_dir, dst_dir)):
    config["auto_map"] = {
      "AutoConfig": "configuration_llada.LLaDAConfig",
      "AutoModel": "modeling_llada.LLaDAModelLM",
      "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    }
  # Last, so that a directory interrupted mid-write is not taken for a complete model.
  with open(os.path.join(dst_dir, CONFIG_JSON), "w") as f:
    json.dump(config, f, indent=2)


def _saved_run_config(path: str) -> dict:
  """The run config (JSON) saved with one of our training checkpoints (step dir or workdir)."""
  step_dir = os.path.dirname(checkpoint.resolve_params_dir(path))
  meta = os.path.join(step_dir, "config", "metadata")
  if not os.path.isfile(meta):
    raise FileNotFoundError(f"no {MODEL_CONFIG_JSON}, {CONFIG_JSON} or saved run config in {path}")
  return _read_json(meta)


def model_config_from_dir(path: str, **overrides) -> model_lib.ModelConfig:
  """ModelConfig of any checkpoint: a converted dir (model_config.json), an HF dir (config.json), or a
  training step dir / checkpoints dir / workdir of ours (the model section of the saved config)."""
  if os.path.isfile(os.path.join(path, MODEL_CONFIG_JSON)):
    fields = _read_json(os.path.join(path, MODEL_CONFIG_JSON))
  elif os.path.isfile(os.path.join(path, CONFIG_JSON)):
    return model_config_from_hf(path, **overrides)
  else:
    fields = {k: v for k, v in _saved_run_config(path).get("model", {}).items() if k != "preset"}
  known = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
  if set(fields) - known:
    raise ValueError(f"model config in {path} has unknown fields {sorted(set(fields) - known)}")
  return model_lib.ModelConfig(**{**fields, **overrides})


def _restore(path: str, cfg: model_lib.ModelConfig):
  """Our params checkpoint as host (CPU) arrays, checked against the model's shapes."""
  device = jax.local_devices(backend="cpu")[0]
  tokens = jnp.zeros((1, 1), jnp.int32)
  init = lambda: model_lib.Transformer(cfg).init(jax.random.PRNGKey(0), tokens, tokens == 0)
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(device)
    ),
    flax.core.meta.unbox(jax.eval_shape(init)["params"]),
  )
  return checkpoint.restore_params(path, abstract)


def hf_to_orbax(src: str, dst: str, dtype: str | None = None) -> model_lib.ModelConfig:
  if not is_hf_dir(src):
    raise ValueError(f"{src} is not a Hugging Face model directory (config.json + safetensors)")
  _require_empty(dst)
  params, cfg = load_hf_params(src, dtype=dtype)
  device = jax.local_devices(backend="cpu")[0]
  checkpoint.save_params(dst, jax.device_put(params, device))
  with open(os.path.join(dst, MODEL_CONFIG_JSON), "w") as f:
    json.dump(dataclasses.asdict(cfg), f, indent=2)
  _copy_side_files(src, dst)
  return cfg


def orbax_to_hf(src: str, dst: str, dtype: str | None = None, max_shard_bytes=DEFAULT_SHARD_BYTES):
  _require_empty(dst)
  if is_hf_dir(src) and not os.path.isfile(os.path.join(src, MODEL_CONFIG_JSON)):
    raise ValueError(
      f"{src} is a Hugging Face model directory already (convert it with --to=orbax)"
    )
  cfg = model_config_from_dir(src)
  side_dir = src
  if not os.path.isfile(os.path.join(src, MODEL_CONFIG_JSON)):
    tokenizer = _saved_run_config(src).get("tokenizer", {})
    path = tokenizer.get("path") or ""
    side_dir = (path if os.path.isdir(path) else os.path.dirname(path)) if path else None
    if tokenizer.get("kind") != "hf" or not side_dir:
      logging.warning("the run's tokenizer is not a Hugging Face tokenizer.json; none is written")
      side_dir = None
  write_hf(_restore(src, cfg), cfg, dst, dtype, max_shard_bytes, src_dir=side_dir)
  return cfg


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  fl = flags.FLAGS
  # Orbax logs every read and write at INFO; the result line below is what matters here.
  logging.get_absl_handler().addFilter(lambda r: r.levelno >= 30 or "orbax" not in r.pathname)
  dtype = None if fl.dtype == "keep" else fl.dtype
  try:
    if not fl.src or not fl.dst:
      raise ValueError("--src and --dst are required")
    if not os.path.exists(fl.src):
      raise FileNotFoundError(f"--src {fl.src} does not exist")
    if fl.to == "orbax":
      cfg = hf_to_orbax(fl.src, fl.dst, dtype)
    else:
      cfg = orbax_to_hf(fl.src, fl.dst, dtype, fl.max_shard_bytes)
  except (ValueError, OSError, checkpoint.CheckpointError) as e:
    logging.debug("failed", exc_info=True)
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(1)
  print(f"wrote {fl.dst} ({cfg.num_params() / 1e6:.2f}M parameters)")


def _define_flags() -> None:
  """Only when run as a program: other modules import this one and may define flags of these names."""
  flags.DEFINE_string(
    "src", None, "Hugging Face LLaDA dir (--to=orbax) or our checkpoint (--to=hf)."
  )
  flags.DEFINE_string("dst", None, "New or empty output directory.")
  flags.DEFINE_enum("to", "orbax", ["orbax", "hf"], "Output format.")
  flags.DEFINE_enum("dtype", "keep", ["keep", "float32", "bfloat16"], "Output parameter dtype.")
  flags.DEFINE_integer("max_shard_bytes", DEFAULT_SHARD_BYTES, "Safetensors shard size (--to=hf).")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
