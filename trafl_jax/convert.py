"""Hugging Face LLaDA checkpoints <-> our orbax params checkpoints.

  python -m trafl_jax.convert --src=HF_DIR --dst=CKPT_DIR             # HF -> orbax params
  python -m trafl_jax.convert --src=CKPT_DIR --dst=HF_DIR --to=hf     # orbax -> HF

The orbax side is what `init_checkpoint` reads: `<dst>/params`, plus `<dst>/model_config.json` (the
ModelConfig fields, so the directory describes itself) and the tokenizer files. The format itself (tensor
names, transposes, config.json, reading safetensors) is `hf_format`; this module writes directories and is the
command line. Dependencies go one way: convert -> checkpoint -> hf_format.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

import jax
from absl import app, flags, logging
from flax import linen as nn
from safetensors import numpy as st_numpy

from trafl_jax import checkpoint, cli, hf_format
from trafl_jax import model as model_lib
from trafl_jax import state as state_lib

MODEL_CONFIG_JSON = "model_config.json"
DEFAULT_SHARD_BYTES = 5_000_000_000  # Hugging Face's save_pretrained default
# Carried between directories: tokenizer, generation defaults, and LLaDA's remote modeling code.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SIDE_FILES = TOKENIZER_FILES + (
  "generation_config.json",
  "configuration_llada.py",
  "modeling_llada.py",
)


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
  tensors = hf_format.params_to_hf(params, cfg)
  if dtype is not None:
    tensors = {k: x.astype(hf_format.DTYPES[dtype]) for k, x in tensors.items()}
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
    st_numpy.save_file(tensors, os.path.join(dst_dir, hf_format.SINGLE_FILE), metadata=metadata)
  else:
    weight_map = {}
    for k, names in enumerate(shards):
      fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
      st_numpy.save_file({n: tensors[n] for n in names}, os.path.join(dst_dir, fname), metadata)
      weight_map.update(dict.fromkeys(names, fname))
    total = sum(x.nbytes for x in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(dst_dir, hf_format.INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
  config = hf_format.hf_config_dict(cfg)
  config["torch_dtype"] = next(iter(tensors.values())).dtype.name
  if {"configuration_llada.py", "modeling_llada.py"} <= set(_copy_side_files(src_dir, dst_dir)):
    config["auto_map"] = {
      "AutoConfig": "configuration_llada.LLaDAConfig",
      "AutoModel": "modeling_llada.LLaDAModelLM",
      "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    }
  # Last, so that a directory interrupted mid-write is not taken for a complete model.
  with open(os.path.join(dst_dir, hf_format.CONFIG_JSON), "w") as f:
    json.dump(config, f, indent=2)


def is_model_dir(path: str) -> bool:
  """A converted directory (ours) or a Hugging Face one: a whole model, not a run's checkpoint."""
  return os.path.isfile(os.path.join(path, MODEL_CONFIG_JSON)) or hf_format.is_hf_dir(path)


def saved_run_config(path: str) -> dict:
  """The run config (JSON) saved with one of our training checkpoints (step dir or workdir)."""
  step_dir = os.path.dirname(checkpoint.resolve_params_dir(path))
  meta = os.path.join(step_dir, "config", "metadata")
  if not os.path.isfile(meta):
    raise FileNotFoundError(
      f"no {MODEL_CONFIG_JSON}, {hf_format.CONFIG_JSON} or saved run config in {path}"
    )
  return hf_format.read_json(meta)


def model_config_from_dir(path: str, **overrides) -> model_lib.ModelConfig:
  """ModelConfig of any checkpoint: a converted dir (model_config.json), an HF dir (config.json), or a
  training step dir / checkpoints dir / workdir of ours (the model section of the saved config)."""
  if os.path.isfile(os.path.join(path, MODEL_CONFIG_JSON)):
    fields = hf_format.read_json(os.path.join(path, MODEL_CONFIG_JSON))
  elif hf_format.is_hf_dir(path):  # a stage's own config.json is not a Hugging Face one
    return hf_format.model_config_from_hf(path, **overrides)
  else:
    fields = {k: v for k, v in saved_run_config(path).get("model", {}).items() if k != "preset"}
  known = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
  if set(fields) - known:
    raise ValueError(f"model config in {path} has unknown fields {sorted(set(fields) - known)}")
  return model_lib.ModelConfig(**{**fields, **overrides})


def _restore(path: str, cfg: model_lib.ModelConfig):
  """Our params checkpoint as host (CPU) arrays, checked against the model's shapes."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
    nn.unbox(state_lib.abstract_params(model_lib.Transformer(cfg))),
  )
  return checkpoint.restore_params(path, abstract)


def hf_to_orbax(src: str, dst: str, dtype: str | None = None) -> model_lib.ModelConfig:
  if not hf_format.is_hf_dir(src):
    raise ValueError(f"{src} is not a Hugging Face model directory (config.json + safetensors)")
  _require_empty(dst)
  params, cfg = hf_format.load_hf_params(src, dtype=dtype)
  device = jax.local_devices(backend="cpu")[0]
  checkpoint.save_params(dst, jax.device_put(params, device))
  with open(os.path.join(dst, MODEL_CONFIG_JSON), "w") as f:
    json.dump(dataclasses.asdict(cfg), f, indent=2)
  _copy_side_files(src, dst)
  return cfg


def orbax_to_hf(src: str, dst: str, dtype: str | None = None, max_shard_bytes=DEFAULT_SHARD_BYTES):
  _require_empty(dst)
  if hf_format.is_hf_dir(src) and not os.path.isfile(os.path.join(src, MODEL_CONFIG_JSON)):
    raise ValueError(
      f"{src} is a Hugging Face model directory already (convert it with --to=orbax)"
    )
  cfg = model_config_from_dir(src)
  side_dir = src
  if not os.path.isfile(os.path.join(src, MODEL_CONFIG_JSON)):
    tokenizer = saved_run_config(src).get("tokenizer", {})
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
  cli.quiet_libraries()  # orbax logs every read and write at INFO; the result line is what matters
  fl = flags.FLAGS
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
