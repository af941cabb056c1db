"""The paper's central comparison on Countdown: one reference, then each objective with the same budget and
several seeds, evaluated together (pass@k up to k = eval_samples, distinct correct answers, two lengths).

  python scripts/compare.py --workdir=runs/compare --seeds=0,1,2 \
    --objectives=diffu_grpo,elbo_grpo,wd1,trafl --eval_samples=64 --eval_limit=200

With the baselines as d1 runs them (8 inner updates per rollout batch on Countdown, clip 0.5, KL 0.04,
temperature 0.9, the token mean per prompt group; TraFL then weights its reused samples): --variant=d1.

Writes <workdir>/eval/{eval.json,eval.md,passk.png,results.json} (every run; passk.png one colour per
objective, its mean over seeds with a band, and pass@k minus the reference's), <workdir>/summary.md (mean and
spread over seeds per objective, then the bootstrap intervals and paired differences) and --results_json
(default <workdir>/results.json; docs/results.json for the record): every figure for k = 1..n with
intervals, the settings (each run's differences from the shared config) and the commit. Each run resumes if
interrupted; finished runs are skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import math as math_config  # noqa: E402
from trafl_jax import cli, config_lib, eval_report, pipeline, report  # noqa: E402

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
_RESULTS = flags.DEFINE_string(
  "results_json", "", "Where results.json goes (default <workdir>/results.json; docs/results.json)."
)


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


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in d.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def run_settings(base: dict, run_dirs: dict[str, str]) -> dict:
  """Each post-trained run's settings where they differ from the shared config (`config.json` of its
  directory, flattened: `rl.objective`, `seed`, ...)."""
  flat_base, out = _flat(base), {}
  for label, run_dir in run_dirs.items():
    path = os.path.join(run_dir, "config.json")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        flat = _flat(json.load(f))
      out[label] = {k: v for k, v in flat.items() if k not in flat_base or flat_base[k] != v}
  return out


def main(argv):
  del argv
  cli.quiet_libraries()
  workdir = os.path.abspath(_WORKDIR.value)
  base = _config()
  with base.unlocked():
    base.stages = ("reference",)
  pipeline.run(base, workdir)  # the shared reference (skipped when already trained)
  reference = os.path.join(workdir, "reference")
  checkpoints, labels, run_dirs = [reference], ["reference"], {}
  for seed in map(int, _SEEDS.value):
    for objective in _OBJECTIVES.value:
      run_dir = os.path.join(workdir, f"seed{seed}", objective)
      pipeline.posttrain_stage(_config(seed, objective), run_dir, reference)
      checkpoints.append(run_dir)
      labels.append(f"{objective}/s{seed}")
      run_dirs[labels[-1]] = run_dir
  with base.unlocked():
    base.eval.seed = 0
  eval_dir = os.path.join(workdir, "eval")
  summary = pipeline.evaluate_stage(base, checkpoints, eval_dir, labels)
  table = summary_table(summary["results"], _OBJECTIVES.value)
  flag_names = ("seeds", "objectives", "variant", "eval_samples", "eval_limit")
  compare = {name: flags.FLAGS[name].value for name in flag_names}
  runs = run_settings(config_lib.record(base), run_dirs)
  # The statistics again, now with each run's settings in results.json (same records, same report).
  analysis = report.rebuild(eval_dir, base.rl.beta, labels, {"compare": compare, "runs": runs})
  table += "\n" + "\n".join(eval_report.statistics_markdown(analysis))
  results_json = _RESULTS.value or os.path.join(workdir, "results.json")
  os.makedirs(os.path.dirname(os.path.abspath(results_json)), exist_ok=True)
  shutil.copyfile(os.path.join(eval_dir, eval_report.RESULTS_FILE), results_json)
  with open(os.path.join(workdir, "summary.md"), "w", encoding="utf-8") as f:
    f.write(table)
  print(table)
  print(f"wrote {workdir}/summary.md, {eval_dir}/passk.png, {results_json}")


if __name__ == "__main__":
  app.run(main)
