"""Rebuilds an evaluation directory's reports from its records, sampling nothing:

  python -m trafl_jax.report --eval_dir=runs/main/eval [--results_json=docs/results.json] [--beta=2]

(eval.json, eval.md, passk.png and results.json: `eval_report` writes them, `evaluate` reads the records;
this module sits above both.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from trafl_jax import eval_report, evaluate


def rebuild(
  eval_dir: str,
  target_beta: float | None = None,
  labels: Sequence[str] = (),
  extra_settings: Mapping | None = None,
) -> dict:
  """Rewrites an evaluation directory's reports from its records (of `labels`, default every
  checkpoint recorded); returns the statistics. The target's beta defaults to the run config's
  `rl.beta` (`config.json`), else the one eval.json shows; the commit is the one eval.json recorded,
  else this code's, marked `(rebuild)`."""
  old = eval_report._load(os.path.join(eval_dir, "eval.json")) or {"config": {}, "results": []}
  run_config = eval_report._load(os.path.join(eval_dir, "config.json"))
  if target_beta is None and run_config:
    target_beta = run_config.get("rl", {}).get("beta")
  if target_beta is None:
    target_beta = next((r["beta"] for r in old["results"] if r.get("target")), None)
  done = evaluate._read_records(os.path.join(eval_dir, evaluate.RECORDS_FILE))
  if not done:
    raise FileNotFoundError(f"no records in {eval_dir}/{evaluate.RECORDS_FILE}")
  labels = list(labels) or list(dict.fromkeys(key[0] for key in done))
  summary = evaluate._summaries(done, labels, target_beta)
  commit = old.get("commit") or eval_report.git_commit() + " (rebuild)"
  records = [r for key, r in done.items() if key[0] in labels]
  return eval_report.write_reports(
    summary, eval_dir, old["config"], records, target_beta, run_config, commit, extra_settings
  )


def main(argv) -> None:
  del argv
  import sys

  from absl import flags

  f = flags.FLAGS
  try:
    analysis = rebuild(f.eval_dir, f.beta)
  except (FileNotFoundError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print("\n".join(eval_report.statistics_markdown(analysis)))
  print(f"wrote {f.eval_dir}/eval.json, eval.md, passk.png, {eval_report.RESULTS_FILE}")
  if f.results_json:
    eval_report.write_json(
      eval_report._load(os.path.join(f.eval_dir, eval_report.RESULTS_FILE)), f.results_json
    )
    print(f"wrote {f.results_json}")


def _define_flags() -> None:
  from absl import flags

  flags.DEFINE_string("eval_dir", None, "An evaluation directory (with eval_records.jsonl).")
  flags.DEFINE_string(
    "results_json", None, "Also write results.json here (e.g. docs/results.json)."
  )
  flags.DEFINE_float("beta", None, "The tilted target's beta (default: the run's rl.beta).")
  flags.mark_flags_as_required(["eval_dir"])


if __name__ == "__main__":
  from absl import app

  from trafl_jax import cli

  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
