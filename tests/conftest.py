"""Tests run on 8 fake CPU devices, set before JAX initializes."""

import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

SHARED_DATA = ROOT.parent / "shared" / "data"


FAMILIES = ("llada", "dream")


def family_config(family: str, **overrides):
  """`small_model_config` of a model family (Dream: biased q/k/v, shifted predictions)."""
  from trafl_jax import model as model_lib

  extra = model_lib.DREAM_FIELDS if family == "dream" else {}
  return small_model_config(**{**extra, **overrides})


def small_model_config(**overrides):
  """The small transformer most tests use (special ids: pad 0, eos 3, mask 4); override any field."""
  from trafl_jax import model as model_lib

  values = dict(
    vocab_size=32,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    mlp_hidden=48,
    mask_token_id=4,
    eos_token_id=3,
    pad_token_id=0,
  )
  return model_lib.ModelConfig(**{**values, **overrides})
