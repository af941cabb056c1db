"""Tests run on 8 fake CPU devices, set before JAX initializes."""

import os
import pathlib
import sys

import pytest

# XLA's CPU compiler at its cheapest: the test models are tiny, so compiling, not running, is the suite's
# time, and LLVM's optimizations and the fusion emitters are most of compiling (a micro-batch test: 59 s
# -> 21 s). The numerics are XLA's either way (no fast math). Subprocesses get them too (`subprocess_env`).
COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
# The user's own flags, less those set here (xdist's workers inherit the controller's environment).
_USER_FLAGS = [
  f
  for f in os.environ.get("XLA_FLAGS", "").split()
  if f not in COMPILE_FLAGS.split() and not f.startswith("--xla_force_host_platform_device_count")
]
_BASE_FLAGS = " ".join([*_USER_FLAGS, COMPILE_FLAGS])


def subprocess_env(devices: int | None = 8) -> dict:
  """The environment of a CLI the tests start: CPU, the compile flags, `devices` fake devices (None:
  a launcher adds them)."""
  flags = (
    _BASE_FLAGS
    if devices is None
    else f"{_BASE_FLAGS} --xla_force_host_platform_device_count={devices}"
  )
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}


os.environ["XLA_FLAGS"] = f"{_BASE_FLAGS} --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

SHARED_DATA = ROOT.parent / "shared" / "data"


FAMILIES = ("llada", "dream")


@pytest.fixture(scope="module")
def parity_rewards():
  """Countdown's reward replaced by the parity of the completion's length in characters: a 0/1 reward
  that varies within almost every rollout group, whatever the tiny reference learned. Its 20 steps solve
  almost no problem, so whether a first batch held a correct answer (and TraFL's or GRPO's first step had
  a gradient at all) was the luck of the CPU's arithmetic; tests of the loop's mechanics use this."""
  from trafl_jax.tasks import countdown

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(
      countdown, "reward", lambda completion, numbers, target: float(len(completion) % 2)
    )
    yield


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
