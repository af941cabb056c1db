"""Run by tests/test_multihost.py in every process of a local multi-process run (not a test itself):
splits scoring work with `distributed.map_split` and prints what this process saw and got, as JSON."""

import json

from trafl_jax import distributed


def main() -> None:
  distributed.initialize(distributed.settings())
  import jax

  seen = []

  def score(part):
    seen.extend(part)
    return [len(item) * 0.5 for item in part]

  items = [("x" * i) for i in range(11)]  # not a multiple of the process count
  out = distributed.map_split(score, items)
  print("RESULT " + json.dumps({"process": jax.process_index(), "seen": seen, "out": out}))


if __name__ == "__main__":
  main()
