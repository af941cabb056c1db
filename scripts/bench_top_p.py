"""Dream's top-p two ways on one vocabulary-sized batch: the sort and cumulative sum of Dream's own
`top_p_logits` (as XLA runs it) against `sampler.top_p_threshold`'s bisection. Prints the time per call,
the compiled temporaries, and how the kept sets compare (float64 mass above each method's last kept token).

    python3 scripts/bench_top_p.py [--rows=2 --positions=64 --vocab=152064 --top_p=0.95 --scale=3]
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trafl_jax import sampler  # noqa: E402

LOWEST = float(jnp.finfo(jnp.float32).min)


def by_sort(x, top_p):
  s = -jnp.sort(-x, axis=-1)
  c = jnp.cumsum(jax.nn.softmax(s, axis=-1), axis=-1)
  keep = 1 + jnp.sum(c[..., :-1] <= top_p, axis=-1, keepdims=True)
  return jnp.where(x < jnp.take_along_axis(s, keep - 1, axis=-1), LOWEST, x)


def by_bisection(x, top_p):
  return jnp.where(x < sampler.top_p_threshold(x, top_p), LOWEST, x)


def main() -> None:
  parser = argparse.ArgumentParser()
  for name, default in (("rows", 2), ("positions", 64), ("vocab", 152064)):
    parser.add_argument(f"--{name}", type=int, default=default)
  parser.add_argument("--top_p", type=float, default=0.95)
  parser.add_argument("--scale", type=float, default=3.0, help="logits ~ N(0, scale^2)")
  a = parser.parse_args()
  x = jax.random.normal(jax.random.PRNGKey(0), (a.rows, a.positions, a.vocab)) * a.scale
  xs = np.asarray(x, np.float64)
  p = np.exp(xs - xs.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  kept = {}
  for name, f in (("sort", by_sort), ("bisection", by_bisection)):
    fn = jax.jit(lambda x, f=f: f(x, a.top_p))
    kept[name] = np.asarray(fn(x)) > LOWEST
    start = time.perf_counter()
    for _ in range(3):
      fn(x).block_until_ready()
    seconds = (time.perf_counter() - start) / 3
    temp = fn.lower(x).compile().memory_analysis().temp_size_in_bytes / 2**20
    smallest = np.where(kept[name], xs, np.inf).min(-1, keepdims=True)
    above = (p * (xs > smallest)).sum(-1)
    print(
      f"{name}: {seconds:.3f} s a call, temporaries {temp:.0f} MiB, tokens kept per position "
      f"{kept[name].sum(-1).mean():.1f}, float64 mass above the last kept: max {above.max():.9f}"
    )
  differ = (kept["sort"] != kept["bisection"]).sum(-1)
  print(
    f"kept sets: {np.mean(differ > 0):.3f} of positions differ, by at most {differ.max()} token(s)"
  )


if __name__ == "__main__":
  main()
