"""The sampler's fast modes against the exact sampler on a trained model: greedy accuracy, pass@k, the
fraction of greedy tokens equal to the exact sampler's, model evaluations per token and seconds, for each
mode, on the same problems and seeds.

  python scripts/sampler_quality.py --checkpoint=runs/math/reference --gen_length=16 --block_length=16
  python scripts/sampler_quality.py --checkpoint=runs/math/reference --gen_length=64 --block_length=16 \
      --out=docs/sampler_quality_64.json

Modes are `name=key:value+key:value` (`dual_t0.9=cache:dual+threshold:0.9+stop_at_eos:1`), comma
separated; the default list covers each cache, thresholds and stop_at_eos. pass@1 has a 95% bootstrap
interval over problems, and `greedy_diff` the paired interval of the greedy accuracy minus the exact's.
Seconds are wall time on whatever else the machine runs.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trafl_jax import cli, evaluate, sample, stats  # noqa: E402
from trafl_jax import tasks as tasks_lib  # noqa: E402

DEFAULT_MODES = (
  "exact=",
  "prefix=cache:prefix",
  "dual=cache:dual",
  "eos=stop_at_eos:1",
  "t0.9=threshold:0.9",
  "t0.7=threshold:0.7",
  "dual_t0.9_eos=cache:dual+threshold:0.9+stop_at_eos:1",
  "dual_t0.7_eos=cache:dual+threshold:0.7+stop_at_eos:1",
)

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A trained model (any kind sample loads).")
_SPLIT = flags.DEFINE_string("split", "test", "Countdown split.")
_LIMIT = flags.DEFINE_integer("limit", 200, "Problems.")
_SAMPLES = flags.DEFINE_integer("samples", 16, "Samples per problem at temperature 1 (pass@k).")
_GEN = flags.DEFINE_integer("gen_length", 16, "Completion length.")
_STEPS_PER_TOKEN = flags.DEFINE_float(
  "steps_per_token",
  None,
  "Exact schedule: steps / length (default: the run's eval setting, else 0.5).",
)
_BLOCK = flags.DEFINE_integer("block_length", 16, "Block length.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Sampler rows per call.")
_MODES = flags.DEFINE_list("modes", list(DEFAULT_MODES), "name=key:value,... per mode.")
_OUT = flags.DEFINE_string("out", "", "Where to write the JSON (default: print only).")


def parse_mode(spec: str) -> tuple[str, dict]:
  """`dual_t0.9=cache:dual+threshold:0.9` -> ("dual_t0.9", {"cache": "dual", "threshold": 0.9})."""
  name, _, body = spec.partition("=")
  kinds = {
    "cache": str,
    "refresh_every": int,
    "threshold": float,
    "threshold_floor": str,
    "micro_batch": int,
  }
  modes = {}
  for item in [i for i in body.split("+") if i]:
    key, _, value = item.partition(":")
    modes[key] = bool(int(value)) if key == "stop_at_eos" else kinds[key](value)
  return name, modes


def main(argv):
  del argv
  cli.quiet_libraries()
  generator = sample.Generator.load(_CHECKPOINT.value)
  # The run's own settings when the checkpoint is a run's workdir: its problems look like its data.
  run = {}
  run_config = os.path.join(_CHECKPOINT.value, "config.json")
  if os.path.exists(run_config):
    with open(run_config, encoding="utf-8") as f:
      run = json.load(f)
  data = run.get("data", {})
  steps_per_token = _STEPS_PER_TOKEN.value or run.get("eval", {}).get("steps_per_token", 0.5)
  problems = evaluate.EvalConfig(
    tasks=("countdown",),
    splits=(_SPLIT.value,),
    limit=_LIMIT.value,
    gen_lengths=(_GEN.value,),
    steps_per_token=steps_per_token,
    block_length=_BLOCK.value,
    remasking=("low_confidence",),
    num_samples=_SAMPLES.value,
    temperature=1.0,
    batch_size=_BATCH.value,
    problems_per_batch=16,
    seed=0,
    countdown_numbers=data.get("countdown_numbers", 3),
    countdown_max_number=data.get("countdown_max_number", 20),
  ).load("countdown", None, _SPLIT.value)
  prompts = [generator.encode(tasks_lib.format_prompt(p)) for p in problems]
  n = _SAMPLES.value
  blocks = _GEN.value // _BLOCK.value
  steps = max(1, round(_GEN.value * steps_per_token / blocks)) * blocks
  base = dict(
    gen_length=_GEN.value, steps=steps, block_length=_BLOCK.value, batch_size=_BATCH.value
  )
  rows, exact_greedy, exact_rewards = [], None, None
  counts_RxQ = stats.bootstrap_counts_RxQ(len(problems))
  for spec in _MODES.value:
    name, modes = parse_mode(spec)
    generator.generate_ids(prompts[:1], **base, **modes)  # compile
    start = time.perf_counter()
    greedy, _, _ = generator.generate_ids(prompts, temperature=0.0, seed=0, **base, **modes)
    seconds = time.perf_counter() - start
    sampled, _, _ = generator.generate_ids(
      [p for p in prompts for _ in range(n)], temperature=1.0, seed=1, **base, **modes
    )
    texts = [generator.decode(t) for t in greedy] + [generator.decode(t) for t in sampled]
    owners = list(problems) + [p for p in problems for _ in range(n)]
    rewards = np.asarray(tasks_lib.rewards(owners, texts), np.float64)
    correct = rewards[len(problems) :].reshape(len(problems), n) > 0
    if exact_greedy is None:  # the first mode is the one compared with
      exact_greedy, exact_rewards = greedy, rewards[: len(problems)]
    nfe = _nfe(generator, prompts, base, modes)
    rows.append(
      dict(
        mode=name,
        settings=modes,
        problems=len(problems),
        greedy=float(rewards[: len(problems)].mean()),
        **{
          f"pass@{k}": float(np.mean([evaluate.pass_at_k(n, int(c), k) for c in correct.sum(1)]))
          for k in evaluate.ks_for(n)
        },
        pass1_interval=stats.interval(correct.mean(1), counts_RxQ),
        greedy_diff=stats.interval(rewards[: len(problems)] - exact_rewards, counts_RxQ),
        agreement=float(np.mean(greedy == exact_greedy)),
        nfe_per_token=nfe,
        greedy_s=seconds,
      )
    )
    print(json.dumps(rows[-1]), flush=True)
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump({"checkpoint": _CHECKPOINT.value, "settings": base, "rows": rows}, f, indent=2)


def _nfe(generator, prompts, base, modes) -> float:
  """Model evaluations per generated token of the greedy run (one sampler call per batch)."""
  from trafl_jax import sampler

  scfg = sampler.SamplerConfig(
    gen_length=base["gen_length"], steps=base["steps"], block_length=base["block_length"], **modes
  )
  fn = generator._fn(scfg)
  total, rows = 0.0, 0
  for start in range(0, len(prompts), base["batch_size"]):
    chunk = prompts[start : start + base["batch_size"]]
    shards = generator.mesh.shape["data"] * generator.mesh.shape["fsdp"]
    prompt_BxP, valid_BxP = generator.pad_prompts(chunk, -(-len(chunk) // shards) * shards)
    out = fn(generator.params, prompt_BxP, valid_BxP, jax.random.PRNGKey(0))
    total += float(np.asarray(out.nfe_B)[: len(chunk)].sum())
    rows += len(chunk)
  return total / rows / base["gen_length"]


if __name__ == "__main__":
  flags.mark_flag_as_required("checkpoint")
  app.run(main)
