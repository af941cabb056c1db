"""Benchmarks that print one JSON line.

  python -m trafl_jax.bench train --preset=small

`fraction_of_peak` compares the train step's model FLOP rate (forward + backward = 3x forward matmul
FLOPs, no remat recompute counted) with a large float32 matmul timed in the same process.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import common
from trafl_jax import model as model_lib
from trafl_jax import sharding
from trafl_jax import state as state_lib
from trafl_jax import train as train_lib

_PRESET = flags.DEFINE_string("preset", "small", "Model size preset (configs/common.py).")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch size.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per row (prompt 64 + completion).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype.")
_REMAT = flags.DEFINE_string("remat", "none", "Remat policy.")
_MATMUL_N = flags.DEFINE_integer("matmul_n", 4096, "Side of the square matmul that measures peak.")


def _best_time(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def matmul_peak_flops(n: int, dtype=jnp.float32) -> float:
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  mm = jax.jit(jnp.matmul)
  jax.block_until_ready(mm(a, b))
  return 2.0 * n**3 / _best_time(lambda: mm(a, b), 5)


def bench_train(preset: str, batch: int, seq_len: int, steps: int, dtype: str, remat: str) -> dict:
  values = {k: v for k, v in common.model_config(preset).items() if k != "preset"}
  values.update(dtype=dtype, remat=remat)
  cfg = model_lib.ModelConfig(**values)
  model = model_lib.Transformer(cfg)
  ocfg = state_lib.OptimConfig(1e-4, "constant", 0, 0.1, 0.01, 0.9, 0.99, 1e-8, 1.0, steps + 1)
  tx = state_lib.make_optimizer(ocfg)
  mesh = sharding.make_mesh({"data": -1})
  rules = sharding.rules_from_config(common.sharding_rules().to_dict())
  state, shardings = state_lib.create_sharded_state(
    model, tx, jax.random.PRNGKey(0), seq_len, mesh, rules
  )
  prompt_len = min(64, seq_len // 4)
  rng = np.random.default_rng(0)
  local = {
    "tokens": rng.integers(5, cfg.vocab_size, (batch, seq_len)).astype(np.int32),
    "valid": np.ones((batch, seq_len), bool),
    "completion": np.broadcast_to(np.arange(seq_len) >= prompt_len, (batch, seq_len)).copy(),
  }
  shapes = {k: (v.shape, v.dtype) for k, v in local.items()}
  step = train_lib.compile_train_step(
    model, state_lib.learning_rate_schedule(ocfg), 1e-3, state, shardings, shapes, mesh, rules
  )
  batch_arrays = sharding.global_batch(local, mesh, rules)
  state, m = step(state, batch_arrays)
  jax.block_until_ready(m)
  start = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch_arrays)
  jax.block_until_ready((state, m))
  seconds = (time.perf_counter() - start) / steps
  tokens = batch * seq_len
  flops = 3.0 * model_lib.flops_per_token(cfg, seq_len) * tokens
  return {
    "bench": "train",
    "preset": preset,
    "params": cfg.num_params(),
    "batch": batch,
    "seq_len": seq_len,
    "dtype": dtype,
    "remat": remat,
    "devices": jax.device_count(),
    "platform": jax.devices()[0].platform,
    "step_s": seconds,
    "tokens_per_s": tokens / seconds,
    "flops_per_s": flops / seconds,
  }


def main(argv):
  if len(argv) != 2 or argv[1] not in ("train",):
    raise app.UsageError("usage: python -m trafl_jax.bench train [--preset=small ...]")
  result = bench_train(
    _PRESET.value, _BATCH.value, _SEQ_LEN.value, _STEPS.value, _DTYPE.value, _REMAT.value
  )
  peak_dtype = jnp.bfloat16 if result["platform"] != "cpu" and _DTYPE.value == "bfloat16" else None
  peak = matmul_peak_flops(_MATMUL_N.value, peak_dtype or jnp.float32)
  result["matmul_peak_flops_per_s"] = peak
  result["matmul_dtype"] = "bfloat16" if peak_dtype else "float32"
  result["fraction_of_peak"] = result["flops_per_s"] / peak
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
