"""Hugging Face LLaDA checkpoints <-> our orbax params checkpoints.

  python -m trafl_jax.convert --src=HF_DIR --dst=CKPT_DIR             # HF -> orbax params
  python -m trafl_jax.convert --src=CKPT_DIR --dst=HF_DIR --to=hf     # orbax -> HF
  python -m trafl_jax.convert --src=LORA_RUN --dst=HF_DIR --to=hf --merge_lora  # adapters merged
  python -m trafl_jax.convert --src=LORA_RUN --dst=PEFT_DIR --to=peft  # PEFT's adapter files

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

from trafl_jax import checkpoint, cli, hf_format, lora
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
  "configuration_dream.py",
  "modeling_dream.py",
  "generation_utils.py",
)
# A family's remote code, when the source directory has it: config.json's auto_map.
_AUTO_MAPS = {
  "llada": (
    {"configuration_llada.py", "modeling_llada.py"},
    {
      "AutoConfig": "configuration_llada.LLaDAConfig",
      "AutoModel": "modeling_llada.LLaDAModelLM",
      "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    },
  ),
  "dream": (
    {"configuration_dream.py", "modeling_dream.py"},
    {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
  ),
}


def _require_empty(path: str) -> None:
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise ValueError(f"destination {path} exists and is not empty; refusing to overwrite it")


def _copy_side_files(src_dir: str | None, dst_dir: str, names=SIDE_FILES) -> list[str]:
  copied = []
  for name in names if src_dir else ():
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
  code, auto_map = _AUTO_MAPS[cfg.family]
  if code <= set(_copy_side_files(src_dir, dst_dir)):
    config["auto_map"] = auto_map
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
  """Our params checkpoint as host (CPU) arrays, checked against the model's shapes (a lora run's:
  its base and adapters, `lora_run_params`)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
    nn.unbox(state_lib.abstract_params(model_lib.Transformer(cfg))),
  )
  if cfg.lora_rank and not is_model_dir(path):
    base_cfg = lora.base_config(cfg)
    return lora_run_params(path, abstract, lambda base: _restore(base, base_cfg))
  return checkpoint.restore_params(path, abstract)


def lora_run_params(path: str, abstract, restore_base):
  """A lora run's policy: its checkpoint holds the adapters (restored into `abstract`'s adapter
  leaves); the base is the run's recorded `rl.reference` (`restore_base(path)`), checked against the
  fingerprint the run recorded and cast to the run's `lora.base_dtype`."""
  saved = saved_run_config(path)
  base = saved.get("lora_base")
  if not base:
    raise ValueError(f"{path} holds adapters but its run config records no base (lora_base)")
  if not os.path.exists(base["path"]):
    raise ValueError(
      f"{path} holds adapters for the base {base['path']}, which does not exist: put the base back "
      "there (its fingerprint is checked)"
    )
  params = restore_base(base["path"])
  if not lora.same_base(lora.fingerprint(params), base["fingerprint"]):
    raise ValueError(
      f"{path} holds adapters trained on the base {base['path']}, whose parameters have changed "
      "since (fingerprints differ)"
    )
  dtype = saved.get("lora", {}).get("base_dtype")
  if dtype:
    params = jax.jit(lambda t: lora.prepare_base(t, dtype))(params)
  adapters = checkpoint.restore_params(path, lora.adapters_of(abstract))
  return lora.combine(params, adapters)


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


def orbax_to_hf(
  src: str,
  dst: str,
  dtype: str | None = None,
  max_shard_bytes=DEFAULT_SHARD_BYTES,
  merge_lora: bool = False,
):
  """Our checkpoint as a Hugging Face directory of its family (LLaDA or Dream); a lora run's with its
  adapters merged into the kernels (`merge_lora`, required for one)."""
  _require_empty(dst)
  if hf_format.is_hf_dir(src) and not os.path.isfile(os.path.join(src, MODEL_CONFIG_JSON)):
    raise ValueError(
      f"{src} is a Hugging Face model directory already (convert it with --to=orbax)"
    )
  cfg = model_config_from_dir(src)
  if cfg.lora_rank and not merge_lora:
    raise ValueError(
      f"{src} holds low-rank adapters: --merge_lora writes the merged model, --to=peft the adapters"
    )
  side_dir = _side_dir(src)
  params = _restore(src, cfg)
  if cfg.lora_rank:
    params = lora.merged(params, cfg)
    cfg = lora.base_config(cfg)
  write_hf(params, cfg, dst, dtype, max_shard_bytes, src_dir=side_dir)
  return cfg


def orbax_to_peft(src: str, dst: str, dtype: str | None = None) -> model_lib.ModelConfig:
  """A lora run's adapters as PEFT's `adapter_config.json` + `adapter_model.safetensors` (PEFT's key
  names and lora_A / lora_B layouts; its base is the run's rl.reference), with the tokenizer files."""
  _require_empty(dst)
  cfg = model_config_from_dir(src) if not is_model_dir(src) else None
  if cfg is None or not cfg.lora_rank:
    raise ValueError(f"{src} is not a lora run's checkpoint (no adapters to export)")
  side_dir = _side_dir(src)
  tensors = hf_format.adapters_to_peft(_restore(src, cfg), cfg)
  if dtype is not None:
    tensors = {k: x.astype(hf_format.DTYPES[dtype]) for k, x in tensors.items()}
  os.makedirs(dst, exist_ok=True)
  weights = os.path.join(dst, hf_format.PEFT_WEIGHTS)
  st_numpy.save_file(tensors, weights, metadata={"format": "pt"})
  _copy_side_files(side_dir, dst, TOKENIZER_FILES)
  config = hf_format.peft_config_dict(cfg, saved_run_config(src)["lora_base"]["path"])
  with open(os.path.join(dst, hf_format.PEFT_CONFIG), "w") as f:  # last: the directory is complete
    json.dump(config, f, indent=2)
  return cfg


def _side_dir(src: str) -> str | None:
  """Where a checkpoint's tokenizer and side files are: the directory itself for a converted one, the
  run's Hugging Face tokenizer directory for a run (None without one)."""
  side_dir = src
  if not os.path.isfile(os.path.join(src, MODEL_CONFIG_JSON)):
    tokenizer = saved_run_config(src).get("tokenizer", {})
    path = tokenizer.get("path") or ""
    side_dir = (path if os.path.isdir(path) else os.path.dirname(path)) if path else None
    if tokenizer.get("kind") != "hf" or not side_dir:
      logging.warning("the run's tokenizer is not a Hugging Face tokenizer.json; none is written")
      side_dir = None
  return side_dir


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
    if fl.merge_lora and fl.to != "hf":
      raise ValueError("--merge_lora is for --to=hf (a merged Hugging Face model)")
    if fl.to == "orbax":
      cfg = hf_to_orbax(fl.src, fl.dst, dtype)
    elif fl.to == "peft":
      cfg = orbax_to_peft(fl.src, fl.dst, dtype)
    else:
      cfg = orbax_to_hf(fl.src, fl.dst, dtype, fl.max_shard_bytes, fl.merge_lora)
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
  flags.DEFINE_enum("to", "orbax", ["orbax", "hf", "peft"], "Output format.")
  flags.DEFINE_bool(
    "merge_lora", False, "--to=hf of a lora run: fold its adapters into the kernels."
  )
  flags.DEFINE_enum("dtype", "keep", ["keep", "float32", "bfloat16"], "Output parameter dtype.")
  flags.DEFINE_integer("max_shard_bytes", DEFAULT_SHARD_BYTES, "Safetensors shard size (--to=hf).")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
