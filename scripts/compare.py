"""The paper's central comparison on Countdown: one reference, then each objective with the same budget and
several seeds, evaluated together (pass@k up to k = eval_samples, distinct correct answers, two lengths).

  python scripts/compare.py --workdir=runs/compare --seeds=0,1,2 \
    --objectives=diffu_grpo,elbo_grpo,wd1,trafl --eval_samples=64 --eval_limit=200

With the baselines as d1 runs them (8 inner updates per rollout batch on Countdown, clip 0.5, KL 0.04,
temperature 0.9, the token mean per prompt group; TraFL then weights its reused samples): --variant=d1.

Writes <workdir>/eval/{eval.json,eval.md,passk.png} (every run) and <workdir>/summary.md (mean and spread over
seeds per objective). Each run resumes if interrupted; finished runs are skipped.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import math as math_config  # noqa: E402
from trafl_jax import cli, pipeline  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/compare", "Where everything goes.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Post-training seeds.")
_OBJECTIVES = flags.DEFINE_list(
  "objectives", ["diffu_grpo", "elbo_grpo", "wd1", "trafl"], "Objectives."
)
_VARIANT = flags.DEFINE_string(
  "variant", "", "configs/math.py variant (e.g. tiny for a smoke test)."
)
_SAMPLES = flags.DEFINE_integer("eval_samples", 64, "Samples per problem (pass@k up to this k).")
_LIMIT = flags.DEFINE_integer("eval_limit", 200, "Held-out problems.")


def _config(seed: int | None = None, objective: str | None = None):
  config = math_config.get_config(_VARIANT.value)
  with config.unlocked():
    config.eval.num_samples = _SAMPLES.value
    config.eval.limit = _LIMIT.value
    if seed is not None:
      config.seed = seed
    if objective is not None:
      config.rl.objective = objective
  return config


def summary_table(results: list[dict], objectives: list[str]) -> str:
  lines = []
  for gen_length in sorted({r["gen_length"] for r in results}):
    rows = [r for r in results if r["gen_length"] == gen_length]
    ks = sorted(int(k[5:]) for k in rows[0] if k.startswith("pass@"))
    keys = ["greedy"] + [f"pass@{k}" for k in ks] + ["distinct_correct_answers", "commit_entropy"]
    lines += [
      f"### gen_length {gen_length}",
      "",
      "| model | " + " | ".join(keys) + " |",
      "|" + "---|" * (len(keys) + 1),
    ]
    for name in ["reference", *objectives]:
      group = [r for r in rows if r["checkpoint"] == name or r["checkpoint"].startswith(name + "/")]
      if not group:
        continue
      cells = []
      for key in keys:
        values = np.array([r[key] for r in group])
        cells.append(f"{values.mean():.3f}" + (f" ± {values.std():.3f}" if len(values) > 1 else ""))
      lines.append(f"| {name} (n={len(group)}) | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def main(argv):
  del argv
  cli.quiet_libraries()
  workdir = os.path.abspath(_WORKDIR.value)
  base = _config()
  with base.unlocked():
    base.stages = ("reference",)
  pipeline.run(base, workdir)  # the shared reference (skipped when already trained)
  reference = os.path.join(workdir, "reference")
  checkpoints, labels = [reference], ["reference"]
  for seed in map(int, _SEEDS.value):
    for objective in _OBJECTIVES.value:
      run_dir = os.path.join(workdir, f"seed{seed}", objective)
      pipeline.posttrain_stage(_config(seed, objective), run_dir, reference)
      checkpoints.append(run_dir)
      labels.append(f"{objective}/s{seed}")
  with base.unlocked():
    base.eval.seed = 0
  summary = pipeline.evaluate_stage(base, checkpoints, os.path.join(workdir, "eval"), labels)
  table = summary_table(summary["results"], _OBJECTIVES.value)
  with open(os.path.join(workdir, "summary.md"), "w", encoding="utf-8") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  app.run(main)
