"""The Hugging Face checkpoint formats of LLaDA and Dream: tensor names <-> our params tree, config.json
<-> ModelConfig (the family from `model_type`).

Reading an HF directory (single-file or sharded safetensors) into our params lives here, below both
`checkpoint` (which loads HF directories as `init_checkpoint`) and `convert` (which writes converted
directories). Conversion is a rename and a transpose (torch Linear weights are [out, in], flax Dense kernels
[in, out]); with scanned layers each block tensor is stacked on a leading layer axis. Every check names all
offending tensors; nothing is filled in.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re

import flax
import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

from trafl_jax import model as model_lib

PREFIX = "model.transformer."
CONFIG_JSON = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
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
# Dream (Qwen2's names; DiffuCoder is Dream-shaped): N = n_heads * head_dim = D. Biases are [out].
_DREAM_BLOCK_MAP = (
  ("input_layernorm.weight", ("attn_norm", "scale"), "D", False),
  ("self_attn.q_proj.weight", ("attn", "q_proj", "kernel"), "DD", True),
  ("self_attn.q_proj.bias", ("attn", "q_proj", "bias"), "D", False),
  ("self_attn.k_proj.weight", ("attn", "k_proj", "kernel"), "KD", True),
  ("self_attn.k_proj.bias", ("attn", "k_proj", "bias"), "K", False),
  ("self_attn.v_proj.weight", ("attn", "v_proj", "kernel"), "KD", True),
  ("self_attn.v_proj.bias", ("attn", "v_proj", "bias"), "K", False),
  ("self_attn.o_proj.weight", ("attn", "attn_out", "kernel"), "DD", True),
  ("post_attention_layernorm.weight", ("ff_norm", "scale"), "D", False),
  ("mlp.gate_proj.weight", ("mlp", "ff_proj", "kernel"), "FD", True),
  ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), "FD", True),
  ("mlp.down_proj.weight", ("mlp", "ff_out", "kernel"), "DF", True),
)
_DREAM_TOP_MAP = (
  ("model.embed_tokens.weight", ("wte",), "VD", False),
  ("model.norm.weight", ("ln_f", "scale"), "D", False),
  ("lm_head.weight", ("ff_out", "kernel"), "VD", True),  # absent when tied to the embedding
)
# family -> (top-level name prefix, a block's name prefix, block map, top map: embedding first).
_LAYOUTS = {
  "llada": (PREFIX, PREFIX + "blocks.{i}.", _BLOCK_MAP, _TOP_MAP),
  "dream": ("", "model.layers.{i}.", _DREAM_BLOCK_MAP, _DREAM_TOP_MAP),
}
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
  """Yields (hf name, flax path, layer index on the stacked axis or None, torch shape, transposed),
  in the layout of the model's family (biases only with `qkv_bias`, no head when it is tied)."""
  dims = dict(D=cfg.d_model, K=cfg.n_kv_heads * cfg.head_dim, F=cfg.mlp_hidden, V=cfg.vocab_size)
  shape = lambda spec: tuple(dims[c] for c in spec)
  prefix, block_prefix, block_map, top_map = _LAYOUTS[cfg.family]
  keep = lambda path: (
    (path[-1] != "bias" or cfg.qkv_bias)
    and not (cfg.tie_embeddings and path == ("ff_out", "kernel"))
  )
  name, path, spec, transposed = top_map[0]
  yield prefix + name, path, None, shape(spec), transposed
  for i in range(cfg.n_layers):
    for name, path, spec, transposed in block_map:
      if not keep(path):
        continue
      hf_name = block_prefix.format(i=i) + name
      if cfg.scan_layers:
        yield hf_name, ("blocks", *path), i, shape(spec), transposed
      else:
        yield hf_name, (f"blocks_{i}", *path), None, shape(spec), transposed
  for name, path, spec, transposed in top_map[1:]:
    if keep(path):
      yield prefix + name, path, None, shape(spec), transposed


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


# PEFT's LoRA adapter files: `lora_A.weight` [r, in] and `lora_B.weight` [out, r] per adapted Linear,
# under the PeftModel's prefix; PEFT computes `W x + (alpha / r) B A x`, ours `x K + (alpha / r) (x a) b`
# with K = W^T, so A = a^T and B = b^T.
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _adapter_mapping(cfg: model_lib.ModelConfig):
  """Yields (PEFT name of A, of B, flax module path, layer index on the stacked axis or None)."""
  for i in range(cfg.n_layers):
    for name, path, _, _ in _BLOCK_MAP:
      if path[-1] != "kernel" or path[-2] not in cfg.lora_targets:
        continue
      module = f"{PEFT_PREFIX}{PREFIX}blocks.{i}.{name.removesuffix('.weight')}"
      flax_module = ("blocks", *path[:-1]) if cfg.scan_layers else (f"blocks_{i}", *path[:-1])
      yield (
        module + ".lora_A.weight",
        module + ".lora_B.weight",
        flax_module,
        (i if cfg.scan_layers else None),
      )


def adapters_to_peft(params, cfg: model_lib.ModelConfig) -> dict[str, np.ndarray]:
  """A lora model's adapters as PEFT's tensors (the base's leaves are ignored)."""
  flat = _flatten(params)
  tensors = {}
  for name_a, name_b, module, layer in _adapter_mapping(cfg):
    a, b = flat[(*module, "lora_a")], flat[(*module, "lora_b")]
    if layer is not None:
      a, b = a[layer], b[layer]
    tensors[name_a] = np.ascontiguousarray(a.T)
    tensors[name_b] = np.ascontiguousarray(b.T)
  return tensors


def peft_config_dict(cfg: model_lib.ModelConfig, base: str) -> dict:
  """PEFT's `adapter_config.json` for the adapters of `cfg`. The targets are a regex over the block
  projections: LLaDA's output head is also named `ff_out` and is not adapted."""
  names = "|".join(t for t in model_lib.PROJECTIONS if t in cfg.lora_targets)
  return {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": base,
    "r": cfg.lora_rank,
    "lora_alpha": cfg.lora_alpha,
    "lora_dropout": 0.0,
    "bias": "none",
    "fan_in_fan_out": False,
    "target_modules": rf"{re.escape(PREFIX)}blocks\.\d+\.({names})",
    "modules_to_save": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "init_lora_weights": True,
    "use_rslora": False,
    "use_dora": False,
    "inference_mode": True,
  }


def read_json(path: str) -> dict:
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
    weight_map = read_json(index_path).get("weight_map")
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


def family_of(c: dict, path: str) -> str:
  """The model family a `config.json` describes, from its `model_type` (LLaDA's may lack one)."""
  model_type = c.get("model_type")
  for family, name in model_lib.FAMILIES.items():
    if model_type == name or (model_type is None and family == "llada"):
      return family
  raise ValueError(
    f"{path}: model_type {model_type!r} is not a family this code reads "
    f"({sorted(model_lib.FAMILIES.values())})"
  )


def _dream_config(c: dict, path: str) -> dict:
  """ModelConfig fields from a Dream `config.json` (Qwen2's field names)."""
  bad = [
    f"{k}={c.get(k)!r}"
    for k, ok in (("hidden_act", (None, "silu")), ("rope_scaling", (None,)))
    if c.get(k) not in ok
  ]
  if bad:
    raise ValueError(f"{path}: unsupported Dream settings (this model has no such variant): {bad}")
  need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
  missing = [k for k in (*need, "vocab_size", "mask_token_id", "eos_token_id") if c.get(k) is None]
  if missing:
    raise ValueError(f"{path}: missing fields {missing}")
  return dict(
    vocab_size=c["vocab_size"],
    d_model=c["hidden_size"],
    n_layers=c["num_hidden_layers"],
    n_heads=c["num_attention_heads"],
    n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
    mlp_hidden=c["intermediate_size"],
    mask_token_id=c["mask_token_id"],
    eos_token_id=c["eos_token_id"],
    pad_token_id=c["eos_token_id"] if c.get("pad_token_id") is None else c["pad_token_id"],
    rope_theta=float(c.get("rope_theta") or 10000.0),
    rms_norm_eps=float(c.get("rms_norm_eps") or 1e-6),
    tie_embeddings=bool(c.get("tie_word_embeddings", False)),
    **model_lib.DREAM_FIELDS,
  )


def model_config_from_hf(hf_dir: str, **overrides) -> model_lib.ModelConfig:
  """ModelConfig from a LLaDA or Dream `config.json` (the family from its `model_type`); `overrides`
  set the compute-only fields (dtype, ...)."""
  path = os.path.join(hf_dir, CONFIG_JSON)
  c = read_json(path)
  if family_of(c, path) == "dream":
    return model_lib.ModelConfig(**{**_dream_config(c, path), **overrides})
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


def _dream_config_dict(cfg: model_lib.ModelConfig) -> dict:
  return {
    "architectures": ["DreamModel"],
    "model_type": "Dream",
    "hidden_size": cfg.d_model,
    "intermediate_size": cfg.mlp_hidden,
    "num_hidden_layers": cfg.n_layers,
    "num_attention_heads": cfg.n_heads,
    "num_key_value_heads": cfg.n_kv_heads,
    "vocab_size": cfg.vocab_size,
    "rope_theta": cfg.rope_theta,
    "rms_norm_eps": cfg.rms_norm_eps,
    "hidden_act": "silu",
    "rope_scaling": None,
    "tie_word_embeddings": cfg.tie_embeddings,
    "mask_token_id": cfg.mask_token_id,
    "eos_token_id": cfg.eos_token_id,
    "pad_token_id": cfg.pad_token_id,
    "use_cache": False,
  }


def hf_config_dict(cfg: model_lib.ModelConfig) -> dict:
  """The family's `config.json` for `cfg` (the inverse of `model_config_from_hf`)."""
  if cfg.family == "dream":
    return _dream_config_dict(cfg)
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
